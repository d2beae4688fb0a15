"""The PNG grid of ``sandbox probe``: per crop, image | prediction | perturbed prediction | flipped | density.

Predictions are drawn in the dataset's palette (:func:`sandbox.analysis.colours.colourize`, padding
white); the flipped-pixels panel shows trusted pixels whose class the step changed in red, other
trusted pixels light grey and untrusted ones dark grey; the density panel the estimator's
log-likelihood of the clean embedding (brighter: denser), or a note when the run has no estimator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from sandbox.analysis.colours import Colour, colourize
from sandbox.analysis.curves import DPI
from sandbox.analysis.prediction_grid import CELL_INCHES
from sandbox.analysis.probe_pass import BatchOutcome
from sandbox.data.views import denormalize

COLUMNS = ("image", "prediction", "perturbed prediction", "flipped pixels", "density (log-lik.)")
"""Titles of the grid's columns."""

MAX_ROWS = 4
"""Crops drawn per grid (the first ones probed)."""

FLIPPED_COLOURS = {"untrusted": (64, 64, 64), "kept": (200, 200, 200), "flipped": (220, 30, 30)}
"""Colours of the flipped-pixels panel."""


def flip_picture(trusted: Tensor, clean: Tensor, perturbed: Tensor) -> np.ndarray:
    """RGB ``(H, W, 3)``: trusted pixels whose class changed red, other trusted light grey, the rest dark."""
    picture = np.empty((*trusted.shape, 3), dtype=np.uint8)
    picture[...] = FLIPPED_COLOURS["untrusted"]
    trusted_np = trusted.numpy()
    changed = trusted_np & (clean != perturbed).numpy()
    picture[trusted_np] = FLIPPED_COLOURS["kept"]
    picture[changed] = FLIPPED_COLOURS["flipped"]
    return picture


def grid_rows(outcomes: list[BatchOutcome], palette: list[Colour], ignore_index: int) -> list[tuple[np.ndarray, ...]]:
    """The first :data:`MAX_ROWS` crops as pictures: image, prediction, perturbed prediction, flips, and
    the density map (or None)."""
    rows = []
    for outcome in outcomes:
        for index in range(outcome.images.shape[0]):
            if len(rows) == MAX_ROWS:
                return rows
            padding = outcome.padding[index].numpy()
            clean, step = outcome.predictions["clean"][index], outcome.predictions["step"][index]
            masks = [np.where(padding, ignore_index, ids.numpy()) for ids in (clean, step)]
            density = None if outcome.log_likelihoods is None else outcome.log_likelihoods["clean"][index].numpy()
            rows.append((
                denormalize(outcome.images[index]).permute(1, 2, 0).numpy(),
                *(colourize(mask, palette, ignore_index) for mask in masks),
                flip_picture(outcome.trusted[index], clean, step),
                density,
            ))
    return rows


def plot_probe_grid(
    outcomes: list[BatchOutcome], palette: list[Colour], ignore_index: int, path: Path, title: str = ""
) -> Path:
    """Draw the probed crops as rows of :data:`COLUMNS` and save a PNG at ``path``."""
    rows = grid_rows(outcomes, palette, ignore_index)
    if not rows:
        raise ValueError("no probed crops to draw")
    figure = Figure(figsize=(len(COLUMNS) * CELL_INCHES, len(rows) * CELL_INCHES + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), len(COLUMNS), squeeze=False)
    for row, pictures in enumerate(rows):
        for column, picture in enumerate(pictures):
            axis = axes[row, column]
            axis.set_axis_off()
            if row == 0:
                axis.set_title(COLUMNS[column], fontsize="small")
            if picture is None:
                axis.text(0.5, 0.5, "no density\nestimator", ha="center", va="center", fontsize="small", transform=axis.transAxes)
            elif picture.ndim == 2:  # the density map, at the features' resolution
                axis.imshow(picture, cmap="viridis", interpolation="nearest")
            else:
                axis.imshow(picture, interpolation="nearest")
    if title:
        figure.suptitle(title, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


__all__ = ["COLUMNS", "plot_probe_grid"]
