"""The Accelerator every command uses: devices, processes and mixed precision from the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator

from sandbox.errors import SandboxError


def has_accelerator_device() -> bool:
    """True when a CUDA, XPU or MPS device is usable."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


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
