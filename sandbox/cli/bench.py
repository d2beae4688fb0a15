"""``sandbox bench``: time training steps (recipe's perturbation vs none) or data loading."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from sandbox.cli.common import PluginOption, RecipeArgument, SetOption, load_resolved_recipe
from sandbox.errors import SandboxError


def bench(
    recipe: Path = RecipeArgument,
    set_: Optional[List[str]] = SetOption,
    plugin: Optional[List[str]] = PluginOption,
    steps: int = typer.Option(20, min=1, help="Timed steps per perturbation."),
    warmup: int = typer.Option(5, min=0, help="Untimed steps first (allocator, cudnn autotuning)."),
    num_classes: Optional[int] = typer.Option(None, help="Classes, if the dataset cannot be read here."),
    data: bool = typer.Option(False, "--data", help="Measure data loading (samples/s) instead of steps."),
    workers: str = typer.Option("0,2", help="With --data: comma-separated DataLoader worker counts."),
    batches: int = typer.Option(20, min=1, help="With --data: batches timed per view."),
) -> None:
    """Print a table of step times (median, p90, images/s, peak memory, GFLOPs, overhead vs none)."""
    from sandbox.bench.data import data_throughput
    from sandbox.bench.steps import time_training_steps
    from sandbox.recipe import ComponentSpec
    from sandbox.train.builder import build_dataset

    resolved, registry = load_resolved_recipe(recipe, set_, plugin)
    console = Console(width=max(Console().width, 120))
    if data:
        counts = [int(part) for part in workers.split(",") if part.strip()]
        table = Table(title=f"data loading: {resolved.name}")
        for column in ("view", "workers", "samples/s"):
            table.add_column(column, justify="right")
        for row in data_throughput(build_dataset(resolved, registry), resolved, counts, batches):
            table.add_row(row.view, str(row.workers), f"{row.samples_per_s:.1f}")
        console.print(table)
        return
    if num_classes is None:
        try:
            num_classes = build_dataset(resolved, registry).num_classes
        except SandboxError as error:
            raise SandboxError(f"{error} (or pass --num-classes to benchmark on synthetic data)") from None
    rows = [time_training_steps(resolved, registry, num_classes, resolved.perturbation, steps, warmup)]
    if resolved.perturbation.name != "none":
        rows.append(time_training_steps(resolved, registry, num_classes, ComponentSpec(name="none"), steps, warmup))
    crop, train = resolved.train.crop_size, resolved.train
    table = Table(title=f"training step: {resolved.name}, crop {crop}, {train.batch_size}+{train.unlabeled_batch_size} "
                        f"images, precision {rows[0].precision}")
    for column in ("perturbation", "median ms", "p90 ms", "images/s", "peak GiB", "GFLOPs/image", "x none"):
        table.add_column(column, justify="right")
    baseline = rows[-1].median_ms
    for row in rows:
        memory = "-" if row.peak_memory_gib is None else f"{row.peak_memory_gib:.2f}"
        table.add_row(row.perturbation, f"{row.median_ms:.1f}", f"{row.p90_ms:.1f}", f"{row.images_per_s:.1f}",
                      memory, f"{row.gflops_per_image:.1f}", f"{row.median_ms / baseline:.2f}")
    console.print(table)
