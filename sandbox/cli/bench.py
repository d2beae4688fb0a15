"""``sandbox bench``: time training steps (recipe's perturbation vs none, or each speed lever) or data loading."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from sandbox.cli.common import PluginOption, RecipeArgument, SetOption
from sandbox.errors import SandboxError
from sandbox.recipe import Recipe, load_resolved_recipe

if TYPE_CHECKING:
    from sandbox.registry import Registry


def bench(
    recipe: Path = RecipeArgument,
    set_: Optional[List[str]] = SetOption,
    plugin: Optional[List[str]] = PluginOption,
    steps: int = typer.Option(20, min=1, help="Timed steps per perturbation (or per lever)."),
    warmup: int = typer.Option(5, min=0, help="Untimed steps first (allocator, cudnn autotuning, compilation)."),
    num_classes: Optional[int] = typer.Option(None, help="Classes, if the dataset cannot be read here."),
    levers: bool = typer.Option(
        False, "--levers", help="One row per speed lever (channels_last, compile, precisions, optimizer_impl) vs eager fp32."
    ),
    only: Optional[str] = typer.Option(
        None, "--only", help="With --levers: comma-separated rows to time besides eager (channels_last, compile, bf16, fp16, foreach, fused, all)."
    ),
    data: bool = typer.Option(False, "--data", help="Measure data loading (samples/s) instead of steps."),
    workers: str = typer.Option("0,2", help="With --data: comma-separated DataLoader worker counts."),
    batches: int = typer.Option(20, min=1, help="With --data: batches timed per view."),
) -> None:
    """Print a table of step times (median, p90, images/s, peak memory, GFLOPs, overhead vs none)."""
    from sandbox.train.builder import build_dataset

    if data and levers:
        raise SandboxError("--data and --levers measure different things: pass one of them")
    if only is not None and not levers:
        raise SandboxError("--only chooses rows of the --levers table: pass --levers too")
    worker_counts = parse_workers(workers) if data else []
    resolved, registry = load_resolved_recipe(recipe, set_, plugin)
    console = Console(width=max(Console().width, 120))
    if data:
        console.print(data_table(resolved, registry, worker_counts, batches))
        return
    if num_classes is None:
        try:
            num_classes = build_dataset(resolved, registry).num_classes
        except SandboxError as error:
            raise SandboxError(f"{error} (or pass --num-classes to benchmark on synthetic data)") from None
    if levers:
        console.print(lever_table(resolved, registry, num_classes, steps, warmup, lever_names(only)))
    else:
        console.print(step_table(resolved, registry, num_classes, steps, warmup))


def parse_workers(text: str) -> list[int]:
    """``--workers "0,2,4"`` -> ``[0, 2, 4]``: numbers of DataLoader worker processes (0: load in this process)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdecimal() for part in parts):
        raise SandboxError(f"--workers {text!r}: expected comma-separated numbers of DataLoader workers, "
                           "integers >= 0 (0 loads in the main process), e.g. --workers 0,2,4")
    return [int(part) for part in parts]


def data_table(resolved: "Recipe", registry: "Registry", counts: list[int], batches: int) -> Table:
    """Samples/s of every view for each number of DataLoader workers in ``counts``."""
    from sandbox.bench.data import data_throughput
    from sandbox.train.builder import build_dataset

    table = Table(title=f"data loading: {resolved.name}")
    for column in ("view", "workers", "samples/s"):
        table.add_column(column, justify="right")
    for row in data_throughput(build_dataset(resolved, registry), resolved, counts, batches):
        table.add_row(row.view, str(row.workers), f"{row.samples_per_s:.1f}")
    return table


def step_table(resolved: "Recipe", registry: "Registry", num_classes: int, steps: int, warmup: int) -> Table:
    """Step times of the recipe's perturbation and of ``none``."""
    from sandbox.bench.steps import time_training_steps
    from sandbox.recipe import ComponentSpec

    rows = [time_training_steps(resolved, registry, num_classes, resolved.perturbation, steps, warmup)]
    if resolved.perturbation.name != "none":
        rows.append(time_training_steps(resolved, registry, num_classes, ComponentSpec(name="none"), steps, warmup))
    table = Table(title=f"training step: {batch_title(resolved)}, precision {rows[0].precision}")
    for column in ("perturbation", "median ms", "p90 ms", "images/s", "peak GiB", "GFLOPs/image", "x none"):
        table.add_column(column, justify="right")
    baseline = rows[-1].median_ms
    for row in rows:
        flops = "-" if row.gflops_per_image is None else f"{row.gflops_per_image:.1f}"
        table.add_row(row.perturbation, f"{row.median_ms:.1f}", f"{row.p90_ms:.1f}", f"{row.images_per_s:.1f}",
                      memory_text(row.peak_memory_gib), flops, f"{row.median_ms / baseline:.2f}")
    return table


def lever_names(only: str | None) -> list[str] | None:
    """The short lever names of a comma-separated ``--only`` (None: every lever)."""
    if only is None:
        return None
    names = [part.strip() for part in only.split(",") if part.strip()]
    if not names:
        raise SandboxError("--only: expected comma-separated lever names, got nothing")
    return names


def lever_table(
    resolved: "Recipe", registry: "Registry", num_classes: int, steps: int, warmup: int, only: list[str] | None = None
) -> Table:
    """Step times of eager float32, of each speed lever alone and of all of them (or those in
    ``only``), on this process's device."""
    from sandbox.bench.levers import LeverTiming, time_levers
    from sandbox.processes.launch import process_state

    def progress(row: LeverTiming) -> None:
        print(f"measured {row.lever.label}: {row.timing.median_ms:.1f} ms/step, x{row.ratio:.2f}", file=sys.stderr, flush=True)

    device = process_state().device
    rows = time_levers(resolved, registry, num_classes, device, steps, warmup, progress, only)
    table = Table(title=f"speed levers: {batch_title(resolved)}, perturbation {resolved.perturbation.name}, {device.type}")
    for column in ("lever", "precision", "median ms", "p90 ms", "x eager fp32", "peak GiB"):
        table.add_column(column, justify="right")
    for row in rows:
        timing = row.timing
        table.add_row(row.lever.label, timing.precision, f"{timing.median_ms:.1f}", f"{timing.p90_ms:.1f}",
                      f"{row.ratio:.2f}", memory_text(timing.peak_memory_gib))
    return table


def batch_title(resolved: "Recipe") -> str:
    """``NAME, crop C, B+U images``: what a step table measures."""
    train = resolved.train
    return f"{resolved.name}, crop {train.crop_size}, {train.batch_size}+{train.unlabeled_batch_size} images"


def memory_text(gib: float | None) -> str:
    """Peak device memory in GiB, ``-`` where none is measured (a CPU)."""
    return "-" if gib is None else f"{gib:.2f}"
