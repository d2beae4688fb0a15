"""One training iteration around the step: backward, optimizer, schedule and EMA teacher.

The training loop and ``sandbox bench`` run this same code, so a benchmark times what a run
executes (non-finite checks, the teacher's update and its buffer averaging included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from sandbox.recipe import TrainSection
from sandbox.train.accelerator import average_buffers
from sandbox.train.ema import ema_decay, update_teacher
from sandbox.train.sync_batchnorm import is_synchronised
from sandbox.train.step import LabeledBatch, SemiSupervisedStep, UnlabeledBatch


def build_optimizer(
    model: nn.Module, settings: TrainSection, lr: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD or AdamW (``train.optimizer``) over the encoder (``lr``) and the decoder (``lr`` x
    ``head_lr_multiplier``), poly schedule over ``iters``."""
    groups = [
        {"params": model.encoder_parameters(), "lr": lr},
        {"params": model.decoder_parameters(), "lr": lr * settings.head_lr_multiplier},
    ]
    if settings.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(1.0 - step / settings.iters, 0.0) ** settings.poly_power
    )
    return optimizer, schedule


@dataclass
class IterationResult:
    """What one iteration did: the step's logged values, whether the loss was finite, whether it updated."""

    logs: dict[str, Tensor]
    finite: bool
    stepped: bool
    """The optimizer step was applied (a non-finite loss or an fp16 overflow skips it)."""


class TrainingIteration:
    """Runs iteration ``step``: the step's loss, then backward, optimizer, schedule and teacher update.

    ``model``, ``optimizer`` and ``scheduler`` are the Accelerate-prepared ones; ``teacher`` is
    the plain EMA copy.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        teacher: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        step_fn: SemiSupervisedStep,
        settings: TrainSection,
    ) -> None:
        self.accelerator, self.model, self.teacher = accelerator, model, teacher
        self.optimizer, self.scheduler, self.step_fn, self.settings = optimizer, scheduler, step_fn, settings
        self.copy_buffers = settings.teacher_statistics == "student"
        self.average_teacher_buffers = not is_synchronised(teacher)
        """Without sync_bn each process's teacher collects statistics of its own shard: averaged each step."""

    def __call__(
        self, step: int, labeled: LabeledBatch, unlabeled: UnlabeledBatch | None, partners: UnlabeledBatch | None = None
    ) -> IterationResult:
        """Iteration ``step``; ``unlabeled`` is None during the supervised warm-up; ``partners`` are the
        CutMix partner images with ``train.cutmix_partners = "stream"``."""
        settings, student = self.settings, self.accelerator.unwrap_model(self.model)
        buffers = [buffer.detach().clone() for buffer in student.buffers()]
        with self.accelerator.autocast():
            if unlabeled is None:
                loss, logs = self.step_fn.supervised(self.model, self.teacher, labeled)
            else:
                if step == settings.warmup_iters:  # the teacher starts as the student
                    update_teacher(self.teacher, student, 0.0, self.copy_buffers)
                loss, logs = self.step_fn.semi_supervised(step, self.model, self.teacher, labeled, unlabeled, partners)
        self.optimizer.zero_grad(set_to_none=True)
        finite = self.all_finite(loss)
        if finite:
            self.accelerator.backward(loss)
            self.optimizer.step()
            stepped = not self.accelerator.optimizer_step_was_skipped  # an fp16 overflow skips it
        else:  # no update; forget the BatchNorm statistics the bad forward pass collected
            with torch.no_grad():
                for buffer, saved in zip(student.buffers(), buffers):
                    buffer.copy_(saved)
            stepped = False
        self.scheduler.step()
        if stepped and step >= settings.warmup_iters:
            update_teacher(self.teacher, student, ema_decay(step, settings.warmup_iters, settings.ema_decay), self.copy_buffers)
        if self.average_teacher_buffers and (step >= settings.warmup_iters or not self.copy_buffers):
            average_buffers(self.teacher, self.accelerator)  # statistics of this process's shard
        return IterationResult(logs, finite, stepped)

    def all_finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every process (all skip the update together)."""
        flag = torch.isfinite(loss.detach().float()).all().float().reshape(1)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.gather(flag).min().reshape(1)
        return bool(flag.item())
