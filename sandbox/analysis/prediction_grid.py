"""A grid of predictions on a run's first val images: image | ground truth | prediction per row.

Images are taken and predicted exactly as evaluation does (the recipe's ``[eval]`` mode: whole,
centre crop or sliding windows); masks are drawn in the dataset's palette, unlabeled pixels
white, with a legend of the class colours below the grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from sandbox.analysis.colours import colourize
from sandbox.analysis.curves import DPI
from sandbox.analysis.inference import Predictor
from sandbox.data.views import denormalize
from sandbox.train.evaluate import build_val_view
from sandbox.rundir.directory import RunDirectory

CELL_INCHES = 2.0
"""Side of one picture of the grid."""

COLUMNS = ("image", "ground truth", "prediction")
"""Titles of the grid's columns."""

LEGEND_COLUMNS = 6
"""Class colours per legend row."""

LEGEND_ROW_INCHES = 0.3
"""Height of one legend row."""

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]
"""RGB image ``(H, W, 3)`` ``uint8``, ground-truth ids ``(H, W)``, predicted ids ``(H, W)``."""


def run_weights(run_dir: Path) -> Path | None:
    """The run's ``best.pt``, else its ``last.pt``, else None."""
    directory = RunDirectory(run_dir)
    return next((path for path in (directory.best_weights, directory.last_weights) if path.is_file()), None)


def val_samples(predictor: Predictor, count: int) -> list[Sample]:
    """The first ``count`` val images with their masks and predictions, as evaluation sees them."""
    settings, source = predictor.recipe.eval, predictor.source
    dataset = build_val_view(source, settings)
    samples = []
    for index in range(min(count, len(dataset))):
        image, mask = dataset[index]
        predicted = predictor.scores(image[None], settings).argmax(dim=1)[0]
        samples.append((denormalize(image).permute(1, 2, 0).numpy(), mask.numpy(), predicted.numpy()))
    return samples


def grid_inches(num_samples: int, num_classes: int) -> tuple[float, float]:
    """Figure width and height: a cell per picture, plus the legend rows."""
    legend_rows = math.ceil(num_classes / LEGEND_COLUMNS)
    return len(COLUMNS) * CELL_INCHES, num_samples * CELL_INCHES + legend_rows * LEGEND_ROW_INCHES


def plot_prediction_grid(
    samples: list[Sample],
    palette: list[tuple[int, int, int]],
    class_names: list[str],
    ignore_index: int,
    path: Path,
    title: str = "",
) -> Path:
    """Draw the samples as rows of image | ground truth | prediction and save a PNG at ``path``."""
    if not samples:
        raise ValueError("no samples to draw")
    figure = Figure(figsize=grid_inches(len(samples), len(class_names)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(samples), len(COLUMNS), squeeze=False)
    for row, (image, truth, predicted) in enumerate(samples):
        pictures = (image, colourize(truth, palette, ignore_index), colourize(predicted, palette))
        for column, picture in enumerate(pictures):
            axes[row, column].imshow(picture, interpolation="nearest")
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(COLUMNS[column], fontsize="small")
    handles = [Patch(color=np.array(colour) / 255, label=name) for name, colour in zip(class_names, palette)]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(LEGEND_COLUMNS, len(handles)), fontsize="x-small")
    if title:
        figure.suptitle(title, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path
