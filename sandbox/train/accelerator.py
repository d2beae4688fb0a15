"""The Accelerator every command uses, and what training on several processes needs.

Devices, processes and mixed precision come from the recipe; the learning-rate scaling rule,
SyncBatchNorm and the teacher's buffer averaging are for multi-process runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator, PartialState
from torch import nn

from sandbox.errors import SandboxError


def has_accelerator_device() -> bool:
    """True when a CUDA, XPU or MPS device is usable."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def process_state() -> PartialState:
    """This process's place in the launch (the state :func:`make_accelerator`'s Accelerator shares).

    ``cpu=True`` without an accelerator device, as there: created first without it, the state
    would treat each CPU process as a separate single-process run.
    """
    return PartialState(cpu=not has_accelerator_device())


def make_accelerator(
    mixed_precision: str, trackers: Sequence[str] = (), project_dir: Path | None = None
) -> Accelerator:
    """An Accelerator for ``mixed_precision``; CPU-only machines get CPU (gloo) processes.

    Without ``cpu=True`` Accelerate treats each process of a CPU launch (``torchrun`` or
    ``accelerate launch --multi_gpu``) as a separate single-process run. ``trackers`` (e.g.
    ``["tensorboard"]``) log under ``project_dir``.
    """
    try:
        return Accelerator(
            mixed_precision=mixed_precision,
            cpu=not has_accelerator_device(),
            step_scheduler_with_optimizer=False,
            log_with=list(trackers) or None,
            project_dir=str(project_dir) if project_dir is not None else None,
        )
    except (ValueError, ImportError) as error:
        raise SandboxError(f"train.trackers = {list(trackers)!r}: {error}") from None


def effective_precision(accelerator: Accelerator) -> str:
    """The precision the processes really train in: ``fp16`` needs a GPU (on a CPU it is float32, ``no``)."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        return "no"
    return accelerator.mixed_precision


def warn_about_precision(accelerator: Accelerator) -> None:
    """One warning line (main process) when the recipe's mixed precision does not apply on this device."""
    if effective_precision(accelerator) != accelerator.mixed_precision and accelerator.is_main_process:
        print(
            f"warning: train.mixed_precision = {accelerator.mixed_precision!r} needs a GPU; these CPU processes train "
            f"in float32 (bf16 is the CPU's mixed precision); summary.json records mixed_precision = "
            f"{effective_precision(accelerator)!r}",
            file=sys.stderr,
        )


def scaled_lr(lr: float, batch_size: int, num_processes: int, reference_total_batch: int | None) -> float:
    """The learning rate for a total labeled batch of ``batch_size * num_processes`` (linear scaling rule).

    ``reference_total_batch`` is the total batch that ``lr`` was tuned for; None keeps ``lr``.
    E.g. a recipe tuned on 4 GPUs x 4 images (reference 16) run on 8 GPUs x 4 gets ``2 * lr``.
    """
    if reference_total_batch is None:
        return lr
    return lr * batch_size * num_processes / reference_total_batch


def maybe_sync_batchnorm(model: nn.Module, accelerator: Accelerator, enabled: bool) -> nn.Module:
    """``model`` with SyncBatchNorm layers when ``enabled`` and several processes run on CUDA devices.

    SyncBatchNorm only runs on CUDA: asked for on CPU (or other) processes, the main process prints
    one warning line and the BatchNorms stay. A single process keeps BatchNorm (nothing to sync).
    Call before ``accelerator.prepare``.
    """
    if not enabled or accelerator.num_processes == 1:
        return model
    if accelerator.device.type != "cuda":
        if accelerator.is_main_process:
            print(
                f"warning: train.sync_bn needs CUDA devices; the {accelerator.num_processes} "
                f"{accelerator.device.type} processes keep per-process BatchNorm",
                file=sys.stderr,
            )
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@torch.no_grad()
def average_buffers(module: nn.Module, accelerator: Accelerator) -> None:
    """Make ``module``'s buffers identical on every process: floating ones averaged, others the main process's.

    After a forward pass every process holds BatchNorm statistics of its own shard (the teacher's
    own passes, or a student's copied by the EMA); the mean over processes is what a SyncBatchNorm
    teacher (the reference) would collect, and keeps one teacher on every process. Integer
    buffers (``num_batches_tracked``) are equal anyway and taken from the main process. One
    collective per buffer dtype.
    """
    if accelerator.num_processes == 1:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault(buffer.dtype, []).append(buffer)
    for dtype, buffers in groups.items():
        flat = torch.cat([buffer.reshape(-1) for buffer in buffers])
        if dtype.is_floating_point:
            torch.distributed.all_reduce(flat)
            flat /= accelerator.num_processes
        else:
            torch.distributed.broadcast(flat, src=0)
        offset = 0
        for buffer in buffers:
            buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()


def process_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s own random streams (dropout, noise, VAT's start, CutMix boxes).

    The main process keeps ``seed``; every other process gets a different one derived from
    ``(seed, rank)``, so stochastic parts of the step draw independent noise on each process
    (the reference seeds every rank alike) while a run stays reproducible from its seed.
    """
    return seed if rank == 0 else (seed + 1_000_003 * rank) % 2**63

