"""``sandbox plot``: PNG training curves of runs, overlaid per value, and val prediction grids."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sandbox.analysis.runs import find_run_dirs
from sandbox.cli.common import PluginOption, writing_to

CURVES_FOLDER = "curves"
"""Sub-folder of ``--out`` for ``<value>.png`` (one per logged value, every run overlaid)."""

PREDICTIONS_FOLDER = "predictions"
"""Sub-folder of ``--out`` for ``<run>.png`` (image | ground truth | prediction grids)."""

DEFAULT_IMAGES = 4
"""Val images per prediction grid."""


def plot_predictions(run_dir: Path, label: str, file_name: str, out: Path, count: int, plugins: list[str]) -> str:
    """Draw one run's prediction grid into ``predictions/<file_name>.png``; return the line to print."""
    from sandbox.analysis.inference import load_predictor
    from sandbox.analysis.prediction_grid import plot_prediction_grid, run_weights, val_samples
    from sandbox.plugins import load_run_recipe
    from sandbox.rundir.files import RECIPE_FILE

    weights = run_weights(run_dir)
    if weights is None or not (run_dir / RECIPE_FILE).is_file():
        return f"{label}: no best.pt or last.pt yet, no prediction grid"
    recipe, registry = load_run_recipe(run_dir / RECIPE_FILE, [], plugins)
    predictor = load_predictor(recipe, registry, weights)
    samples = val_samples(predictor, count)
    if not samples:
        return f"{label}: the val set is empty, no prediction grid"
    source = predictor.source
    path = out / PREDICTIONS_FOLDER / f"{file_name}.png"
    with writing_to(out):
        plot_prediction_grid(samples, predictor.palette, source.class_names, source.ignore_index, path, f"{label} ({weights.name})")
    return f"{label}: predictions on {len(samples)} val images -> {path}"


def plot(
    runs: List[Path] = typer.Argument(..., help="Run directories or folders holding runs (searched recursively).", show_default=False),
    out: Path = typer.Option(Path("plots"), "--out", help="Output folder: curves/ and predictions/ go here."),
    images: int = typer.Option(DEFAULT_IMAGES, "--images", min=0, help="Val images per prediction grid (0: no grids)."),
    plugin: Optional[List[str]] = PluginOption,
) -> None:
    """Training curves (every value of metrics.jsonl, runs overlaid) and val prediction grids, as PNGs."""
    from sandbox.analysis.curves import file_names, plot_curves, read_metrics, run_labels, series

    def warn(line: str) -> None:
        typer.echo(f"warning: {line}", err=True)

    run_dirs = find_run_dirs(runs)
    labels = run_labels(run_dirs)
    curves = {label: series(read_metrics(run_dir, warn)) for label, run_dir in zip(labels, run_dirs)}
    with writing_to(out):
        written = plot_curves({label: values for label, values in curves.items() if values}, out / CURVES_FOLDER)
    typer.echo(f"curves of {len(run_dirs)} runs: {len(written)} figures in {out / CURVES_FOLDER}")
    if images:
        for run_dir, label, file_name in zip(run_dirs, labels, file_names(labels)):
            typer.echo(plot_predictions(run_dir, label, file_name, out, images, list(plugin or [])))
