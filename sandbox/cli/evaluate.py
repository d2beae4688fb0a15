"""``sandbox eval``: evaluate saved weights on a recipe's val part and print per-class IoU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sandbox.cli.common import PluginOption, RecipeArgument, SetOption

if TYPE_CHECKING:
    from sandbox.train.evaluate import EvalResult


def print_result(result: EvalResult, title: str) -> None:
    """A table of IoU per class, then the mIoU."""
    table = Table()
    table.add_column("class")
    table.add_column("IoU (%)", justify="right")
    for name, iou in result.per_class.items():
        table.add_row(name, "-" if iou is None else f"{100 * iou:.2f}")
    table.add_section()
    table.add_row("mIoU", f"{100 * result.miou:.2f}", style="bold")
    console = Console()
    console.print(Text(title), soft_wrap=True)  # a path: one line, never wrapped
    console.print(table)


def evaluate(
    recipe: Path = RecipeArgument,
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Weights file: a run's best.pt or last.pt."),
    set_: Optional[List[str]] = SetOption,
    plugin: Optional[List[str]] = PluginOption,
) -> None:
    """Evaluate a checkpoint on the recipe's val set and print per-class IoU and mIoU."""
    from sandbox.plugins import load_run_recipe
    from sandbox.train.accelerator import make_accelerator
    from sandbox.train.weights import apply_weights, load_weights
    from sandbox.train.builder import build_dataset, build_model
    from sandbox.train.evaluate import evaluate as evaluate_model, val_loader

    resolved, registry = load_run_recipe(recipe, set_, plugin, beside=[checkpoint.parent])
    weights = load_weights(checkpoint)  # a missing or unreadable file fails before the slow part
    accelerator = make_accelerator(resolved.train.mixed_precision)
    source = build_dataset(resolved, registry)
    model = build_model(resolved, registry, source.num_classes)
    apply_weights(model, weights, checkpoint, resolved.name)
    model.to(accelerator.device)
    loader = val_loader(source, resolved.eval, accelerator)
    result = evaluate_model(model, loader, source.class_names, accelerator, resolved.eval, source.ignore_index)
    if accelerator.is_main_process:
        print_result(result, f"{resolved.name}: {checkpoint}")
