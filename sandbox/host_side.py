"""Work that stays in host memory, and moving its results to the device without waiting for it.

A training step on a GPU should make the host wait for the device at most once (the non-finite
check). Some of its work is host work by nature: random CutMix boxes drawn from a seeded CPU
generator, the indices of the labeled and non-padding pixels computed from the masks as loaded.
:func:`host_side` marks such functions (tools that count host-device synchronisations skip what
they run: on a GPU none of it touches the device), and :func:`to_device` moves their small results
without a synchronisation (pinned memory, an asynchronous copy).
"""

from __future__ import annotations

from types import CodeType
from typing import Callable, TypeVar

import torch
from torch import Tensor

HOST_SIDE_CODE: set[CodeType] = set()
"""The code objects of the functions marked by :func:`host_side`."""

Function = TypeVar("Function", bound=Callable)


def host_side(function: Function) -> Function:
    """Mark ``function`` as working on host memory only (CPU tensors, Python numbers)."""
    HOST_SIDE_CODE.add(function.__code__)
    return function


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (in host memory) on ``device``: on a GPU through pinned memory, copied
    asynchronously (the host does not wait); elsewhere a plain copy, or on the same device a
    tensor object of its own sharing the memory (as on a GPU, the host's tensor and the device's
    stay two objects: a tool that tells them apart, the tests' sync counter, sees which one code uses)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    moved = tensor.to(device)
    return moved.detach() if moved is tensor else moved
