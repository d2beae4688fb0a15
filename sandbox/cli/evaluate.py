"""``sandbox eval``: evaluate saved weights on a recipe's val part and print per-class IoU."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from sandbox.cli.common import PluginOption, RecipeArgument, SetOption, load_resolved_recipe
from sandbox.errors import SandboxError
from sandbox.train.accelerator import make_accelerator
from sandbox.train.builder import build_dataset, build_model
from sandbox.train.evaluate import EvalResult, evaluate as evaluate_model, val_loader


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model weights from ``best.pt``/``last.pt`` of a run, or a plain state-dict file."""
    if not path.is_file():
        raise SandboxError(f"checkpoint {path} does not exist (expected a run's best.pt or last.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SandboxError(f"checkpoint {path} could not be read: {type(error).__name__}: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise SandboxError(f"checkpoint {path} holds no state dict")
    return state


def print_result(result: EvalResult, title: str) -> None:
    """A table of IoU per class, then the mIoU."""
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU (%)", justify="right")
    for name, iou in result.per_class.items():
        table.add_row(name, "-" if iou is None else f"{100 * iou:.2f}")
    table.add_section()
    table.add_row("mIoU", f"{100 * result.miou:.2f}", style="bold")
    Console().print(table)


def evaluate(
    recipe: Path = RecipeArgument,
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Weights file: a run's best.pt or last.pt."),
    set_: Optional[List[str]] = SetOption,
    plugin: Optional[List[str]] = PluginOption,
) -> None:
    """Evaluate a checkpoint on the recipe's val set and print per-class IoU and mIoU."""
    resolved, registry = load_resolved_recipe(recipe, set_, plugin)
    accelerator = make_accelerator(resolved.train.mixed_precision)
    source = build_dataset(resolved, registry)
    model = build_model(resolved, registry, source.num_classes)
    missing, unexpected = model.load_state_dict(load_weights(checkpoint), strict=False)
    if missing or unexpected:
        raise SandboxError(
            f"checkpoint {checkpoint} does not fit recipe {recipe}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.to(accelerator.device)
    loader = val_loader(source, resolved.eval, accelerator)
    result = evaluate_model(model, loader, source.class_names, accelerator, resolved.eval, source.ignore_index)
    if accelerator.is_main_process:
        print_result(result, f"{resolved.name}: {checkpoint}")
