"""What a feature perturbation does to a trained model: the measurements of ``sandbox probe``.

Every function here is pure (tensors in, numbers or tensors out) and does one thing. Feature maps
are ``(B, C, h, w)``, pixel masks ``(B, h, w)`` booleans, logits ``(B, K, H, W)``:

- :func:`relative_norms`: per pixel ``||perturbed - features|| / ||features||`` (the step's size on
  the scale of the features themselves), summarised by :func:`spread` (median, 10th/90th percentile);
- :func:`equal_norm_noise`: random directions with the step's own norm at every pixel, the
  baseline a perturbation is judged against;
- :func:`flipped` / :func:`fraction`: which trusted pixels change their predicted class;
- :func:`log_likelihoods`: the density estimator's log-likelihood of each pixel's embedding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sandbox.rundir.files import finite_or_none
from sandbox.api import DensityEstimator

PERCENTILES = (10.0, 50.0, 90.0)
"""The percentiles of the relative norm that are reported (low, median, high)."""


@dataclass
class Spread:
    """Median and 10th/90th percentiles of per-pixel values (NaN without any pixel)."""

    median: float
    p10: float
    p90: float


@dataclass
class ViewFigures:
    """The figures of one perturbed view (the perturbation's step, or noise of equal norm)."""

    relative_norm: Spread
    """``||perturbed - features|| / ||features||`` over the trusted pixels with non-zero features."""
    flipped_fraction: float
    """Trusted pixels whose predicted class changes, over the trusted pixels (NaN without any)."""
    density_before: float | None = None
    """Mean log-likelihood of the clean embedding over trusted pixels (None without an estimator)."""
    density_after: float | None = None
    """The same for the perturbed embedding."""

    @property
    def density_change(self) -> float | None:
        """``density_after - density_before`` (None without an estimator)."""
        if self.density_before is None or self.density_after is None:
            return None
        return self.density_after - self.density_before


@dataclass
class PerturbationFigures:
    """Everything ``sandbox probe`` reports for one perturbation."""

    name: str
    perturbed_view: bool
    """False when the perturbation returned None (no perturbed view: it moved nothing)."""
    trusted_fraction: float
    """Trusted pixels over non-padding pixels of the probed crops."""
    step: ViewFigures
    noise: ViewFigures
    figure: str | None = None
    """Path of the PNG grid, once written."""
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes None), the density change included."""
        data = asdict(self)
        for view in ("step", "noise"):
            data[view]["density_change"] = getattr(self, view).density_change
        return finite_or_none(data)


def pixel_norms(features: Tensor) -> Tensor:
    """The norm of each pixel's feature vector: ``(B, C, h, w)`` -> ``(B, h, w)`` (float32)."""
    return features.float().norm(dim=1)


def relative_norms(features: Tensor, perturbed: Tensor, pixels: Tensor) -> Tensor:
    """``||perturbed - features|| / ||features||`` of the ``pixels`` (a ``(B, h, w)`` mask) whose
    features are not all zero, as a flat float32 tensor (a dead pixel has no relative size)."""
    sizes = pixel_norms(features)
    steps = pixel_norms(perturbed.float() - features.float())
    counted = pixels & (sizes > 0)
    return steps[counted] / sizes[counted]


def spread(values: Tensor) -> Spread:
    """Median and 10th/90th percentiles of ``values`` (NaN for an empty tensor)."""
    if values.numel() == 0:
        return Spread(math.nan, math.nan, math.nan)
    low, median, high = torch.quantile(values.double(), torch.tensor(PERCENTILES, dtype=torch.float64) / 100).tolist()
    return Spread(median=median, p10=low, p90=high)


def equal_norm_noise(features: Tensor, perturbed: Tensor, generator: torch.Generator) -> Tensor:
    """``features`` plus gaussian directions scaled to the norm of the step ``perturbed - features``
    at every pixel (zero where the step is zero), drawn from ``generator`` (on the CPU)."""
    directions = torch.randn(features.shape, generator=generator, dtype=torch.float32)
    directions = F.normalize(directions, dim=1).to(features.device)
    step = pixel_norms(perturbed.float() - features.float()).unsqueeze(1)
    return features + (directions * step).to(features.dtype)


def flipped(clean_ids: Tensor, perturbed_ids: Tensor) -> Tensor:
    """Pixels ``(B, H, W)`` whose predicted class id differs between the clean and perturbed views."""
    return clean_ids != perturbed_ids


def fraction(selected: Tensor, among: Tensor) -> float:
    """The share of the ``among`` pixels that are ``selected`` (NaN when ``among`` is empty)."""
    total = int(among.sum())
    return int((selected & among).sum()) / total if total else math.nan


def log_likelihoods(density: DensityEstimator, embedding: Tensor) -> Tensor:
    """The estimator's log-likelihood (unlabeled: the mixture over classes) of every pixel of
    ``embedding`` ``(B, D, h, w)``, as a ``(B, h, w)`` float32 map."""
    batch, dim, height, width = embedding.shape
    pixels = embedding.detach().permute(0, 2, 3, 1).reshape(-1, dim).float()
    with torch.no_grad():
        return density.log_prob(pixels).float().reshape(batch, height, width)


def masked_mean(values: Tensor, pixels: Tensor) -> float:
    """The mean of ``values`` over the ``pixels`` mask (NaN without any pixel)."""
    total = int(pixels.sum())
    return float(values[pixels].double().sum()) / total if total else math.nan


__all__ = [
    "PerturbationFigures",
    "Spread",
    "ViewFigures",
    "equal_norm_noise",
    "finite_or_none",
    "flipped",
    "fraction",
    "log_likelihoods",
    "masked_mean",
    "pixel_norms",
    "relative_norms",
    "spread",
]
