"""The speed-lever table of ``sandbox bench --levers``: one row per lever, each timed as a run executes it.

Every row starts from eager float32 (every lever off) and turns one lever on; the last row turns
them all on. Each row is :func:`~sandbox.bench.steps.time_training_steps` on a recipe whose
``[train]`` holds that lever, so its networks get the lever through the training loop's own
:func:`~sandbox.train.levers.build_networks`.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from accelerate.state import AcceleratorState

from sandbox.bench.steps import StepTiming, time_training_steps
from sandbox.errors import SandboxError
from sandbox.recipe import Recipe, TrainSection
from sandbox.registry import Registry

EAGER_FP32: dict[str, Any] = {"channels_last": False, "compile": False, "mixed_precision": "no", "optimizer_impl": "default"}
"""The baseline row's ``[train]`` keys: every lever off."""

BASELINE = "eager"
"""The short name of the eager float32 row, which every table holds (the ratios are to it)."""


@dataclass
class Lever:
    """One row of the table: its short name (``--only``), its label and the ``[train]`` keys it sets
    on top of :data:`EAGER_FP32`."""

    name: str
    label: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class LeverTiming:
    """One row's measurement and its step time relative to eager float32."""

    lever: Lever
    timing: StepTiming
    ratio: float
    """Median step time over the eager float32 row's (below 1: faster)."""


def device_precisions(device: torch.device) -> list[str]:
    """The mixed precisions besides float32 that ``device`` runs: CUDA fp16 (and bf16 where supported), CPU bf16."""
    if device.type == "cuda":
        return ["fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    return ["bf16"]


def levers_for(device: torch.device) -> list[Lever]:
    """The table's rows on ``device``: eager float32, each lever alone, then every lever together."""
    precisions = device_precisions(device)
    rows = [
        Lever(BASELINE, "eager fp32"),
        Lever("channels_last", "channels_last", {"channels_last": True}),
        Lever("compile", "compile", {"compile": True}),
    ]
    rows += [Lever(precision, precision, {"mixed_precision": precision}) for precision in precisions]
    rows += [Lever(impl, f"optimizer {impl}", {"optimizer_impl": impl}) for impl in ("foreach", "fused")]
    together = {"channels_last": True, "compile": True, "mixed_precision": precisions[-1], "optimizer_impl": "fused"}
    rows.append(Lever("all", f"all: channels_last, compile, {precisions[-1]}, fused", together))
    return rows


def chosen_levers(device: torch.device, only: list[str] | None) -> list[Lever]:
    """:func:`levers_for` ``device``, restricted to the short names in ``only`` (all when None);
    the eager float32 row is always kept first. An unknown name is an error naming the valid ones."""
    rows = levers_for(device)
    if only is None:
        return rows
    names = [lever.name for lever in rows]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise SandboxError(
            f"--only: no lever {', '.join(repr(name) for name in unknown)} on {device.type}; expected some of {', '.join(names)}"
        )
    return [lever for lever in rows if lever.name == BASELINE or lever.name in only]


def with_lever(recipe: Recipe, lever: Lever) -> Recipe:
    """``recipe`` with every lever off but ``lever``'s (validated as a recipe's ``[train]``)."""
    train = TrainSection.model_validate({**recipe.train.model_dump(), **EAGER_FP32, **lever.settings})
    return recipe.model_copy(update={"train": train})


def release_memory(device: torch.device) -> None:
    """Free what the previous row held: compiled graphs, tensors, cached device memory."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_levers(
    recipe: Recipe,
    registry: Registry,
    num_classes: int,
    device: torch.device,
    steps: int,
    warmup: int,
    report: Callable[[LeverTiming], None] | None = None,
    only: list[str] | None = None,
) -> list[LeverTiming]:
    """Every row of :func:`chosen_levers` (``only``: short names) timed on ``recipe``'s perturbation, crop and batch.

    ``report`` receives each row as soon as it is measured (a long table shows its progress).
    Each row gets a fresh Accelerate state (rows differ in mixed precision); the state is reset
    again at the end, so later code of this process sets up its own.
    """
    rows: list[LeverTiming] = []
    try:
        for lever in chosen_levers(device, only):
            AcceleratorState._reset_state()
            timing = time_training_steps(
                with_lever(recipe, lever), registry, num_classes, recipe.perturbation, steps, warmup, count_flops=False
            )
            baseline = rows[0].timing.median_ms if rows else timing.median_ms
            rows.append(LeverTiming(lever, timing, timing.median_ms / baseline))
            if report is not None:
                report(rows[-1])
            release_memory(device)
    finally:
        AcceleratorState._reset_state()
    return rows
