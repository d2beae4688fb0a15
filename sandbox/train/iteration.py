"""One training iteration around the step: backward, optimizer, schedule and EMA teacher.

The training loop and ``sandbox bench`` run this same code, so a benchmark times what a run
executes (non-finite checks, the teacher's update and its buffer averaging included).

Outside logging intervals an iteration makes the host wait for the device once: the non-finite
check, which decides whether the optimizer steps. The teacher's BatchNorm statistics, which each
process collects on its own shard without ``sync_bn``, are averaged over the processes only when
they are read (:meth:`TrainingIteration.agree_on_teacher`, before evaluation and checkpoints), not
at every step: their update is linear, so the average of the processes' running statistics is the
running statistic of the averages. A teacher nothing reads (:func:`reads_teacher`) is not updated.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from sandbox.processes.batchnorm import average_buffers, is_synchronised
from sandbox.recipe import Recipe, TrainSection
from sandbox.train.accumulation import mean_logs
from sandbox.train.ema import ema_decay, update_teacher
from sandbox.train.optimizer import build_optimizer  # noqa: F401 - re-exported
from sandbox.train.step import LabeledBatch, SemiSupervisedStep, UnlabeledBatch
from sandbox.train.step_state import StepState


@dataclass
class MicroBatch:
    """One micro-batch of an iteration: its labeled batch, its unlabeled batch (None in the warm-up)
    and, with ``train.cutmix_partners = "stream"``, its CutMix partners."""

    labeled: LabeledBatch
    unlabeled: UnlabeledBatch | None = None
    partners: UnlabeledBatch | None = None


@dataclass
class IterationResult:
    """What one iteration did: the step's logged values, whether the loss was finite, whether it updated."""

    logs: dict[str, Tensor]
    finite: bool
    stepped: bool
    """The optimizer step was applied (a non-finite loss or an fp16 overflow skips it)."""


def reads_teacher(recipe: Recipe) -> bool:
    """Whether anything reads the EMA teacher: its pseudo-labels, or its evaluation."""
    return recipe.train.pseudo_labels == "teacher" or recipe.eval.model != "student"


class TrainingIteration:
    """Runs iteration ``step``: the step's loss, then backward, optimizer, schedule and teacher update.

    ``model``, ``optimizer`` and ``scheduler`` are the Accelerate-prepared ones; ``teacher`` is
    the plain EMA copy, updated only when ``teacher_read`` (see :func:`reads_teacher`).
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
        teacher_read: bool = True,
    ) -> None:
        self.accelerator, self.model, self.teacher = accelerator, model, teacher
        self.optimizer, self.scheduler, self.step_fn, self.settings = optimizer, scheduler, step_fn, settings
        self.teacher_read = teacher_read
        self.statistics = settings.teacher_statistics
        self.average_teacher_buffers = accelerator.num_processes > 1 and not is_synchronised(teacher)
        """Without sync_bn each process's teacher collects statistics of its own shard: averaged when read."""
        self.teacher_buffers_read_each_step = settings.teacher_mode == "eval"
        """A teacher predicting in eval mode normalises with its running statistics at every step."""
        self.teacher_buffers_differ = False
        """The processes' teacher buffers may differ (changed since :meth:`agree_on_teacher`)."""
        student = accelerator.unwrap_model(model)
        self.state = StepState(student, teacher, step_fn.method.density)
        """What the step changes before its non-finite check, as it was before (restored after a non-finite loss)."""

    def __call__(
        self, step: int, labeled: LabeledBatch, unlabeled: UnlabeledBatch | None, partners: UnlabeledBatch | None = None
    ) -> IterationResult:
        """Iteration ``step`` on one batch; ``unlabeled`` is None during the supervised warm-up;
        ``partners`` are the CutMix partner images with ``train.cutmix_partners = "stream"``."""
        return self.accumulate(step, [MicroBatch(labeled, unlabeled, partners)])

    def accumulate(self, step: int, micro_batches: Sequence[MicroBatch]) -> IterationResult:
        """Iteration ``step``: one optimizer step on the gradients of ``micro_batches`` (one, or the
        ``train.total_batch_size`` accumulation's K: :mod:`sandbox.train.accumulation`).

        Each micro-batch's loss is divided by K and backpropagated at once (its graph freed before
        the next forward); every backward pass but the last runs without DDP's all-reduce
        (``accelerator.no_sync``). A non-finite loss on any process, in any micro-batch, skips the
        whole step: no optimizer step, no EMA update, and what the micro-batches before it changed
        (BatchNorm statistics, the density estimator) put back. The schedule and the teacher move
        once per step. Not Accelerate's ``accumulate``: its optimizer steps by counting calls, and a
        step here is skipped as a whole.
        """
        settings, student = self.settings, self.accelerator.unwrap_model(self.model)
        semi_supervised = micro_batches[0].unlabeled is not None
        if semi_supervised and step == settings.warmup_iters and self.teacher_read:  # the teacher starts as the student
            update_teacher(self.teacher, student, 0.0, self.statistics)
        self.state.remember()
        self.optimizer.zero_grad(set_to_none=True)
        count, logs, finite = len(micro_batches), [], True
        for index, batch in enumerate(micro_batches):
            with self.accelerator.autocast():
                if batch.unlabeled is None:
                    loss, micro_logs = self.step_fn.supervised(self.model, self.teacher, batch.labeled)
                else:
                    loss, micro_logs = self.step_fn.semi_supervised(
                        step, self.model, self.teacher, batch.labeled, batch.unlabeled, batch.partners
                    )
            logs.append(micro_logs)
            finite = self.all_finite(loss)
            if not finite:  # every process agrees: the step is skipped, its other micro-batches need no pass
                break
            last = index == count - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                self.accelerator.backward(loss / count if count > 1 else loss)
        if finite:
            self.optimizer.step()
            stepped = not self.accelerator.optimizer_step_was_skipped  # an fp16 overflow skips it
        else:  # no update, and no trace: BatchNorm statistics, the estimator's updates of this step
            self.optimizer.zero_grad(set_to_none=True)
            self.state.restore()
            stepped = False
        if stepped:
            self.scheduler.step()
        else:  # the schedule advances all the same; torch would warn that no optimizer step preceded it
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                self.scheduler.step()
        if stepped and step >= settings.warmup_iters and self.teacher_read:
            update_teacher(self.teacher, student, ema_decay(step, settings.warmup_iters, settings.ema_decay), self.statistics)
        if self.average_teacher_buffers and (step >= settings.warmup_iters or self.statistics == "own"):
            self.teacher_buffers_differ = True  # statistics of this process's shard
            if self.teacher_buffers_read_each_step:
                self.agree_on_teacher()
        return IterationResult(mean_logs(logs), finite, stepped)

    def agree_on_teacher(self) -> None:
        """Average the teacher's buffers over the processes if steps changed them since the last time
        (before anything reads them: evaluation, a checkpoint). Call on every process."""
        if self.teacher_buffers_differ:
            average_buffers(self.teacher, self.accelerator)
            self.teacher_buffers_differ = False

    def all_finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every process (all skip the update together)."""
        flag = torch.isfinite(loss.detach().float()).all().float().reshape(1)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.gather(flag).min().reshape(1)
        return bool(flag.item())
