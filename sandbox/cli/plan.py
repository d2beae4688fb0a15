"""``sandbox plan``: before a run, whether it fits, how much memory, how many FLOPs, how long."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer

from sandbox.cli.common import PluginOption, RecipeArgument, SetOption
from sandbox.errors import SandboxError
from sandbox.recipe import load_resolved_recipe

DEFAULT_GPU_MEMORY_GIB = 80.0
"""The verdict's memory without ``--gpu-memory`` or ``--gpu``: an 80 GB card (A100, H100)."""


def plan(
    recipe: Path = RecipeArgument,
    set_: Optional[List[str]] = SetOption,
    plugin: Optional[List[str]] = PluginOption,
    processes: int = typer.Option(
        1, "--processes", min=1, help="Processes (one GPU each) the run would launch; each holds the recipe's batch."
    ),
    gpu_memory: Optional[float] = typer.Option(
        None, "--gpu-memory", help="GiB of one GPU, for the verdict (default: --gpu's memory, else 80)."
    ),
    gpu_throughput: Optional[float] = typer.Option(
        None, "--gpu-throughput", help="Peak TFLOPS of one GPU at the recipe's precision: estimate the run's time."
    ),
    gpu: Optional[str] = typer.Option(
        None, "--gpu", help="A named GPU for the verdict and the time: H100, H200, A100, V100 or RTX4090."
    ),
    utilisation: float = typer.Option(
        0.04, "--utilisation",
        help="Fraction of the peak TFLOPS the time estimate assumes (0.04: DDFP's reference step measured on an H100, see the README).",
    ),
    num_classes: Optional[int] = typer.Option(None, min=1, help="Classes, if the dataset cannot be read here."),
) -> None:
    """Trace one training step of each phase of the recipe's run on fake tensors (no GPU needed): parameters,
    peak memory per process, FLOPs per step and per run, whether it fits, and (with --gpu or --gpu-throughput)
    an estimate of the run's time."""
    check_options(gpu_memory, gpu_throughput, gpu, utilisation)
    from sandbox.bench.plan import Rates, find_gpu, gpu_rates, plan_lines, trace_plan
    from sandbox.train.builder import build_dataset

    named = find_gpu(gpu) if gpu is not None else None
    resolved, registry = load_resolved_recipe(recipe, set_, plugin)
    rates = None
    if named is not None:
        rates = gpu_rates(named, resolved.train.mixed_precision)
    elif gpu_throughput is not None:
        rates = Rates(gpu_throughput, gpu_throughput, f"{gpu_throughput:g} TFLOPS, --gpu-throughput")
    if num_classes is None:
        try:
            num_classes = build_dataset(resolved, registry).num_classes
        except SandboxError as error:
            raise SandboxError(f"{error} (or pass --num-classes to plan on synthetic data)") from None
    if gpu_memory is not None:
        memory, where = gpu_memory, " (--gpu-memory)"
    elif named is not None:
        memory, where = named.memory_gib, f" ({named.name})"
    else:
        memory, where = DEFAULT_GPU_MEMORY_GIB, " (an 80 GB GPU; --gpu-memory sets another)"
    traced = trace_plan(resolved, registry, num_classes, processes)
    label = named.name if named is not None else "GPU"
    for line in plan_lines(traced, memory, where, rates, label, utilisation):
        typer.echo(line)


def check_options(gpu_memory: float | None, gpu_throughput: float | None, gpu: str | None, utilisation: float) -> None:
    """One-line errors, each naming its option, before anything is built."""
    for option, value, example in (("--gpu-memory", gpu_memory, "80"), ("--gpu-throughput", gpu_throughput, "989")):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SandboxError(f"{option} {value:g}: expected a positive number, e.g. {option} {example}")
    if gpu is not None and gpu_throughput is not None:
        raise SandboxError("--gpu and --gpu-throughput both give the GPU's throughput: pass one of them")
    if not (math.isfinite(utilisation) and 0 < utilisation <= 1):
        raise SandboxError(f"--utilisation {utilisation:g}: expected the fraction of the peak TFLOPS reached, "
                           f"in (0, 1], e.g. --utilisation 0.04")
    if gpu is not None:
        from sandbox.bench.plan import find_gpu

        find_gpu(gpu)
