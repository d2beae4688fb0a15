"""BatchNorm over the batch of every process (``train.sync_bn``), on any device.

By default (``train.sync_bn_impl = "sandbox"``) each BatchNorm's class is swapped for a subclass
that computes the statistics of the global batch with one differentiable all-reduce per layer: in
the forward pass the statistics, in the backward pass the gradient of every process's loss with
respect to them. Its own code never waits for the device (the counts are the shapes' numbers, made
on the device by a fill); with NCCL the all-reduce does not either, while gloo stages CUDA tensors
through host memory and waits for them (CPU processes, or CUDA over gloo). It runs on CUDA and CPU
processes alike and is the class the 1-vs-N parity tests prove.
Parameters, buffers, state-dict keys and hooks stay those of the original module, so checkpoints
load with or without ``sync_bn``.

``train.sync_bn_impl = "torch"`` (CUDA only) converts them to torch's ``SyncBatchNorm`` instead
(timm's converter, which keeps timm's ``BatchNormAct2d`` activation): the same statistics, but its
forward selects the non-empty processes' counts with a boolean mask, a host-device
synchronisation in every BatchNorm layer of every train-mode pass. It stays selectable for
comparison (``benchmarks/gpu_check.sh`` times both).

Without ``sync_bn`` each process's BatchNorm running statistics follow its own batches, and two rules
make them one before anything reads them (evaluation, a checkpoint): the student's become the main
process's (:func:`broadcast_buffers`: what DDP itself sends at each forward pass, so training is
unchanged), the teacher's the processes' mean (:func:`average_buffers`: each teacher collects
statistics of its own shard; their mean is the whole batch's mean, the variance missing the spread
between the processes' means). They stay two:
averaging the student's would change what DDP trains from, broadcasting the teacher's would throw
away every shard but one; one rule would change computed values.
"""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sandbox.errors import SandboxError
from sandbox.processes.collectives import differentiable_sum_over_processes, process_count, process_rank

try:  # timm's BatchNorm + activation layer (timm is a dependency; the guard only keeps this module importable alone)
    from timm.layers import BatchNormAct2d
except ImportError:  # pragma: no cover
    BatchNormAct2d = None


def global_batch_statistics(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, biased variance, count)`` per channel of ``x`` ``(B, C, ...)`` over every process's batch, float32.

    Each process contributes its mean, sum of squared deviations and count; they are combined with
    Chan's parallel formula (stable, as torch's SyncBatchNorm). Differentiable through the all-reduce.
    """
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    values = x.float()
    count = values.numel() // max(channels, 1)
    mean = values.sum(dims) / max(count, 1)
    squared = (values - mean.view(1, channels, *[1] * (x.dim() - 2))).pow(2).sum(dims)
    counted = torch.full((1,), float(count), dtype=mean.dtype, device=mean.device)  # a fill: no copy from the host
    local = torch.cat([mean, squared, counted])
    processes, rank = process_count(), process_rank()
    slots = torch.stack([local if index == rank else torch.zeros_like(local) for index in range(processes)])
    gathered = differentiable_sum_over_processes(slots)
    means, squares, counts = gathered[:, :channels], gathered[:, channels : 2 * channels], gathered[:, -1:].detach()
    total = counts.sum()
    global_mean = (means * counts).sum(0) / total.clamp(min=1.0)
    global_squares = (squares + counts * (means - global_mean).pow(2)).sum(0)
    return global_mean, global_squares / total.clamp(min=1.0), total


class ProcessGroupBatchNorm:
    """Mixed into a BatchNorm's class: train-mode statistics of every process's batch together.

    In eval mode, or on a single process, the layer is its original class. The running statistics
    are updated as torch's SyncBatchNorm updates them (momentum, or the cumulative average when
    ``momentum`` is None; the unbiased variance of the global batch).
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - the name nn.Module's BatchNorms use
        """Normalise ``input`` with the global batch's statistics while training on several processes."""
        module: _BatchNorm = self  # type: ignore[assignment]
        if not module.training or process_count() == 1:
            return super().forward(input)  # type: ignore[misc]
        module._check_input_dim(input)
        mean, variance, total = global_batch_statistics(input)
        if module.track_running_stats and module.running_mean is not None:
            with torch.no_grad():
                module.num_batches_tracked.add_(1)
                factor = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
                unbiased = variance.detach() * total / (total - 1).clamp(min=1.0)
                module.running_mean.lerp_(mean.detach().to(module.running_mean.dtype), factor)
                module.running_var.lerp_(unbiased.to(module.running_var.dtype), factor)
        shape = (1, input.shape[1], *[1] * (input.dim() - 2))
        output = (input.float() - mean.view(shape)) * torch.rsqrt(variance + module.eps).view(shape)
        if module.affine:
            output = output * module.weight.float().view(shape) + module.bias.float().view(shape)
        output = output.to(input.dtype)
        if BatchNormAct2d is not None and isinstance(module, BatchNormAct2d):
            output = module.act(module.drop(output))
        return output


_SWAPPED: dict[type, type] = {}


def _process_group_class(cls: type) -> type:
    """The subclass of BatchNorm class ``cls`` with :class:`ProcessGroupBatchNorm` mixed in (cached)."""
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"ProcessGroup{cls.__name__}", (ProcessGroupBatchNorm, cls), {"__module__": __name__})
    return _SWAPPED[cls]


def _plain_forward(cls: type) -> bool:
    """Whether BatchNorm class ``cls`` normalises as torch's BatchNorm does (then it can be synchronised)."""
    if BatchNormAct2d is not None and issubclass(cls, BatchNormAct2d):
        return cls.forward is BatchNormAct2d.forward
    return cls.forward is _BatchNorm.forward


IMPLEMENTATIONS = ("sandbox", "torch")
"""The values of ``train.sync_bn_impl``: this module's :class:`ProcessGroupBatchNorm`, or torch's SyncBatchNorm."""


def synchronise_batchnorm(model: nn.Module, device: torch.device, implementation: str = "sandbox") -> nn.Module:
    """``model`` with every BatchNorm normalising over the batch of every process.

    ``implementation`` "sandbox": each BatchNorm's class swapped for its
    :class:`ProcessGroupBatchNorm` subclass in place, on any device. "torch": torch's
    SyncBatchNorm (new modules, same parameters), CUDA only. A BatchNorm subclass with a forward
    of its own cannot be synchronised faithfully: a one-line error names it.
    """
    if implementation not in IMPLEMENTATIONS:
        raise SandboxError(f"train.sync_bn_impl = {implementation!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "torch" and device.type != "cuda":
        raise SandboxError(
            f"train.sync_bn_impl = 'torch': torch's SyncBatchNorm runs on CUDA devices only, this process's device "
            f"is {device.type!r}; set sync_bn_impl = 'sandbox' (the same statistics on every device)"
        )
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)]
    for name, module in norms:
        if not isinstance(module, ProcessGroupBatchNorm) and not _plain_forward(type(module)):
            raise SandboxError(
                f"train.sync_bn: {name or 'the model'} is a {type(module).__qualname__}, a BatchNorm with its own forward "
                "that cannot be synchronised across processes; set sync_bn = false or use torch's BatchNorm"
            )
    if implementation == "torch":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    for _, module in norms:
        if not isinstance(module, ProcessGroupBatchNorm):
            module.__class__ = _process_group_class(type(module))
    return model


def is_synchronised(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorms and every one of them normalises over every process's batch."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    return bool(norms) and all(isinstance(m, (nn.SyncBatchNorm, ProcessGroupBatchNorm)) for m in norms)


__all__ = ["IMPLEMENTATIONS", "ProcessGroupBatchNorm", "global_batch_statistics", "is_synchronised", "synchronise_batchnorm"]


def maybe_sync_batchnorm(
    model: nn.Module, accelerator: Accelerator, enabled: bool, implementation: str = "sandbox"
) -> nn.Module:
    """``model`` whose BatchNorms normalise over every process's batch when ``enabled`` and several processes run.

    ``implementation``: ``train.sync_bn_impl`` (:mod:`sandbox.processes.batchnorm`). A single
    process keeps BatchNorm (nothing to sync). Call before ``accelerator.prepare`` (the student)
    and on the teacher alike.
    """
    if not enabled or accelerator.num_processes == 1:
        return model
    return synchronise_batchnorm(model, accelerator.device, implementation)


@torch.no_grad()
def broadcast_buffers(module: nn.Module, accelerator: Accelerator) -> None:
    """Make ``module``'s buffers those of the main process on every process (one collective per dtype).

    Without ``sync_bn`` every process's BatchNorm statistics follow its own batches (DDP
    broadcasts the main process's at each forward pass and each process then updates them with its
    own batch); before evaluation and checkpointing every process takes the main process's, so all
    evaluate and save one and the same model.
    """
    if accelerator.num_processes > 1:
        _exchange_buffers(module, lambda flat: torch.distributed.broadcast(flat, src=0))


def _exchange_buffers(module: nn.Module, exchange: Callable[[torch.Tensor], None]) -> None:
    """Apply the in-place collective ``exchange`` to ``module``'s buffers, one flat tensor per dtype."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault(buffer.dtype, []).append(buffer)
    for buffers in groups.values():
        flat = torch.cat([buffer.reshape(-1) for buffer in buffers])
        exchange(flat)
        offset = 0
        for buffer in buffers:
            buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()


@torch.no_grad()
def average_buffers(module: nn.Module, accelerator: Accelerator) -> None:
    """Make ``module``'s buffers identical on every process: floating ones averaged, others the main process's.

    Without ``sync_bn`` every process holds BatchNorm statistics of its own shard (the teacher's
    own passes, or a student's copied by the EMA); their mean keeps one teacher on every process.
    It approximates what a SyncBatchNorm teacher collects (the mean is exact, the variance misses
    the spread between the processes' means); with ``sync_bn`` the teacher normalises over the
    global batch and needs no averaging. Integer buffers (``num_batches_tracked``) are equal
    anyway and taken from the main process. One collective per buffer dtype.
    """
    processes = accelerator.num_processes
    if processes == 1:
        return

    def average(flat: torch.Tensor) -> None:
        if flat.dtype.is_floating_point:
            torch.distributed.all_reduce(flat)
            flat /= processes
        else:
            torch.distributed.broadcast(flat, src=0)

    _exchange_buffers(module, average)
