"""This process's place in a launch: its Accelerate state, and whether it has an accelerator device."""

from __future__ import annotations

import torch
from accelerate import PartialState

from sandbox.processes.failures import join_restarted_attempt


def has_accelerator_device() -> bool:
    """True when a CUDA, XPU or MPS device is usable."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def process_state() -> PartialState:
    """This process's place in the launch (the state :func:`make_accelerator`'s Accelerator shares).

    ``cpu=True`` without an accelerator device, as there: created first without it, the state
    would treat each CPU process as a separate single-process run.
    """
    join_restarted_attempt(cpu=not has_accelerator_device())
    return PartialState(cpu=not has_accelerator_device())
