"""What the code of every process needs to compute what one process computes (public).

A run on N processes means one process on the concatenated batch (README, "What N processes
compute"; ``train.loss_pixel_count = "per_process"`` trades that for the references' per-GPU
normalisation of the losses). The step, the density estimators and plugins reach the other processes only through
these helpers, which are plain no-ops without an initialised ``torch.distributed`` group (one
process, ``sandbox bench``, a unit test).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

from sandbox.host_side import host_side


def process_count() -> int:
    """The number of processes of an initialised torch.distributed group (1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def process_rank() -> int:
    """This process's rank in an initialised torch.distributed group (0 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


_HOST_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The gloo group for host tensors, by the default group it accompanies (made once for each)."""


def host_group() -> ProcessGroup | None:
    """A process group that all-reduces tensors in host memory without touching a device: None (the
    default group) when the default backend handles CPU tensors (gloo, or a backend per device type
    with gloo for the CPU), else a gloo group over the same processes, made on the first call. Every
    process must make that first call at the same point: the training loop makes it when it starts
    (:func:`prepare_host_group`), so a gloo problem (e.g. a node whose network interface gloo cannot
    find: ``GLOO_SOCKET_IFNAME``) ends the run at its start, not at its first density update."""
    if "gloo" in str(torch.distributed.get_backend()):
        return None
    world = torch.distributed.group.WORLD
    if world not in _HOST_GROUPS:
        _HOST_GROUPS[world] = torch.distributed.new_group(backend="gloo")
    return _HOST_GROUPS[world]


def prepare_host_group() -> None:
    """Make :func:`host_group` now, on several processes (call on every process, at the same point)."""
    if process_count() > 1:
        host_group()


@host_side
def host_values_of_every_process(value: int) -> list[int]:
    """Every process's ``value`` (a host number, e.g. a tensor's size), in rank order: one all-reduce of
    host memory (:func:`host_group`), so the host never waits for a device. ``[value]`` on one process."""
    processes = process_count()
    if processes == 1:
        return [value]
    slots = torch.zeros(processes, dtype=torch.int64)
    slots[process_rank()] = value
    torch.distributed.all_reduce(slots, group=host_group())
    return slots.tolist()


def sum_over_processes(values: Tensor) -> Tensor:
    """``values`` summed over every process (a new tensor; ``values`` itself on one process).

    One all-reduce, no host synchronisation: the sum stays on the device.
    """
    if process_count() == 1:
        return values
    values = values.clone()
    torch.distributed.all_reduce(values)
    return values


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward pass all-reduces the incoming gradients (see
    :func:`differentiable_sum_over_processes`). torch's own ``torch.distributed.nn.functional.all_reduce``
    does the same but is deprecated (a FutureWarning on every process at each first call)."""

    @staticmethod
    def forward(ctx: object, values: Tensor) -> Tensor:  # noqa: D102 - autograd's protocol
        summed = values.clone()
        torch.distributed.all_reduce(summed)
        return summed

    @staticmethod
    @once_differentiable  # the in-place collective is not differentiable itself
    def backward(ctx: object, gradient: Tensor) -> Tensor:  # noqa: D102 - autograd's protocol
        summed = gradient.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(summed)
        return summed


def differentiable_sum_over_processes(values: Tensor) -> Tensor:
    """``values`` summed over every process, with gradients flowing back to each process's share.

    The backward pass all-reduces the incoming gradients, so ``d(sum of every process's loss) /
    d(values)`` reaches every process: what a SyncBatchNorm does with its statistics. Every
    process must call it the same number of times, in the same order, forward and backward.
    """
    if process_count() == 1:
        return values
    return _SumOverProcesses.apply(values)


def share_of_total(count: Tensor, total: Tensor) -> Tensor:
    """``processes * count / total``: the factor that turns a mean over this process's ``count``
    items into its share of the mean over every process's ``total`` items, as DDP averages
    gradients over processes (1 on one process; 0 for a process without items; total 0 -> 0)."""
    return count.float() * process_count() / total.float().clamp(min=1.0)


def mean_over_processes(values: dict[str, Tensor]) -> dict[str, float]:
    """Each scalar of ``values`` averaged over every process (logged values: the step logs each
    process's share of a global mean, whose average over processes is the global mean; with
    ``train.loss_pixel_count = "per_process"`` each process's own mean, whose average is the loss
    DDP's averaged gradients descend: in both modes the logged loss is the one trained).

    Keys only some processes have keep this process's own value. One object gather and one
    all-reduce; call on every process at the same point (a logging interval).
    """
    processes = process_count()
    common = sorted(values)
    if processes > 1:
        gathered: list[list[str] | None] = [None] * processes
        torch.distributed.all_gather_object(gathered, common)
        common = sorted(set.intersection(*(set(keys or []) for keys in gathered)))
    result = {key: float(value) for key, value in values.items() if key not in common}
    if common:
        device = next((v.device for v in values.values() if v.device.type != "cpu"), torch.device("cpu"))
        stacked = torch.stack([values[key].detach().float().reshape(()).to(device) for key in common])
        result.update(zip(common, (sum_over_processes(stacked) / processes).tolist()))
    return result
