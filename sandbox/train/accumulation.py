"""Gradient accumulation: a recipe's total batch (``train.total_batch_size``) on fewer processes.

N processes reach a total of ``T`` labeled images per optimizer step by accumulating
``K = T / (batch_size * N)`` micro-batches: micro-batch ``k`` of process ``r`` holds the images that
process ``r * K + k`` of an ``N * K``-process run holds (:class:`~sandbox.data.views.MicroBatchStreamSampler`),
each micro-batch's loss is divided by ``K`` (DDP averages the processes' gradients: the optimizer sees
the mean over the ``N * K`` micro-batches' gradients, as on ``N * K`` processes), and only the last
micro-batch's backward pass all-reduces. What still differs from ``N * K`` processes (README "The
same training on fewer GPUs"): BatchNorm normalises each micro-batch with its own statistics (with
``sync_bn``: over the processes' micro-batches, not the whole step's batch) and its running statistics
move once per micro-batch; the density estimator updates once per micro-batch, on that micro-batch's
features; noise drawn from the global generator (CutMix boxes, dropout) comes from one stream per process.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sandbox.errors import SandboxError
from sandbox.recipe import TrainSection

@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's labeled batch is made: ``processes`` x ``accumulation`` micro-batches of ``micro_batch``."""

    micro_batch: int
    processes: int
    accumulation: int

    @property
    def total(self) -> int:
        """Labeled images per optimizer step over every process."""
        return self.micro_batch * self.processes * self.accumulation

    def record(self) -> dict[str, int]:
        """For ``summary.json``: processes, micro-batch, accumulation and the total batch."""
        return {"processes": self.processes, "micro_batch_size": self.micro_batch,
                "accumulation_steps": self.accumulation, "total_batch_size": self.total}


def batch_plan(settings: TrainSection, processes: int) -> BatchPlan:
    """The accumulation that reaches ``train.total_batch_size`` on ``processes`` processes (1 when it is unset).

    Raises a one-line :class:`SandboxError` when the total is not a multiple of ``batch_size x
    processes`` (the launch cannot reach it exactly), and when accumulating with
    ``loss_pixel_count = "global"`` (a pixel count over the whole step is known only after its last
    micro-batch's forward pass).
    """
    micro = settings.batch_size
    total = settings.total_batch_size
    if total is None:
        return BatchPlan(micro, processes, 1)
    per_step = micro * processes
    if total % per_step:
        nearest = sorted({max(per_step, total // per_step * per_step), -(-total // per_step) * per_step})
        raise SandboxError(
            f"train.total_batch_size = {total} is not a multiple of train.batch_size ({micro}) x {processes} "
            f"process{'es' if processes > 1 else ''} = {per_step}: this launch cannot accumulate to it exactly "
            f"(it reaches {' or '.join(map(str, nearest))}); change the number of processes or batch_size"
        )
    plan = BatchPlan(micro, processes, total // per_step)
    if plan.accumulation > 1 and settings.loss_pixel_count == "global":
        raise SandboxError(
            f"train.total_batch_size = {total} on {processes} process{'es' if processes > 1 else ''} accumulates "
            f"{plan.accumulation} micro-batches of {micro}, but train.loss_pixel_count = 'global' divides each loss "
            "by the pixel count of the whole step's batch, unknown before its last micro-batch; set "
            "loss_pixel_count = 'per_process' (each micro-batch its own count, as each GPU of the reference)"
        )
    return plan


def mean_logs(logs: list[dict[str, Tensor | float]]) -> dict[str, Tensor | float]:
    """Each logged value's mean over the micro-batches that produced it (one step's values, as the
    processes' values are averaged when logged)."""
    if len(logs) == 1:
        return logs[0]
    keys = list(dict.fromkeys(key for entry in logs for key in entry))
    means = {}
    for key in keys:
        values = [entry[key].detach() if isinstance(entry[key], Tensor) else float(entry[key]) for entry in logs if key in entry]
        means[key] = sum(values[1:], values[0]) / len(values)
    return means
