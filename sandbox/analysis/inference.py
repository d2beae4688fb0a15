"""Predictions of saved weights: the recipe's model and dataset, images read from disk, class masks.

Images at most the recipe's evaluation crop (``eval.crop_size``, else ``train.crop_size``) on
each side are predicted whole; larger ones with sliding windows of that crop
(:func:`sandbox.train.evaluate.predict`, ``eval.stride`` or two thirds of the crop apart), so
any image size fits in memory and sees the model at the scale it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sandbox.analysis.colours import Colour, full_palette
from sandbox.api import SegmentationNetwork, SegmentationSource
from sandbox.data.views import normalize
from sandbox.errors import SandboxError
from sandbox.recipe import EvalSection, Recipe
from sandbox.registry import Registry
from sandbox.train.weights import apply_weights, load_weights
from sandbox.train.builder import build_dataset, build_model
from sandbox.train.evaluate import predict

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Files taken from a folder of images (case-insensitive)."""


def inference_device() -> torch.device:
    """A CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Predictor:
    """A model with saved weights, in eval mode, and the dataset of its recipe."""

    model: SegmentationNetwork
    source: SegmentationSource
    recipe: Recipe
    device: torch.device

    @property
    def palette(self) -> list[Colour]:
        """The dataset's colour per class (completed with VOC colours if it is short)."""
        return full_palette(self.source.palette, self.source.num_classes)

    @property
    def crop_size(self) -> int:
        """The largest side predicted in one pass: the eval crop, else the training crop."""
        return self.recipe.eval.crop_size or self.recipe.train.crop_size

    @torch.no_grad()
    def scores(self, images: torch.Tensor, settings: EvalSection) -> torch.Tensor:
        """Class scores ``(B, K, H, W)`` of normalised images, as evaluation computes them."""
        return predict(self.model, images.to(self.device), settings).float().cpu()

    def predict_image(self, image: torch.Tensor) -> tuple[np.ndarray, bool]:
        """Class ids ``(H, W)`` of a ``uint8`` image ``(3, H, W)``, and whether windows were used."""
        sliding = max(image.shape[-2:]) > self.crop_size
        settings = EvalSection(mode="sliding" if sliding else "whole", crop_size=self.crop_size, stride=self.recipe.eval.stride)
        scores = self.scores(normalize(image)[None], settings)
        return scores.argmax(dim=1)[0].numpy().astype(np.int64), sliding


def load_predictor(recipe: Recipe, registry: Registry, checkpoint: Path) -> Predictor:
    """Build the recipe's dataset and model and load ``checkpoint`` (a run's best.pt or last.pt)."""
    weights = load_weights(checkpoint)  # a missing or unreadable file fails before the slow part
    source = build_dataset(recipe, registry)
    model = build_model(recipe, registry, source.num_classes)
    apply_weights(model, weights, checkpoint, recipe.name)
    device = inference_device()
    return Predictor(model.to(device).eval(), source, recipe, device)


def collect_images(paths: list[Path]) -> list[Path]:
    """Image files given directly, or the ``.jpg``/``.jpeg``/``.png`` files inside given folders."""
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SandboxError(f"folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} images")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise SandboxError(f"image or folder {path} does not exist")
    stems = [image.stem for image in images]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise SandboxError(f"two images are named {repeated[0]!r}; their outputs would collide, predict them separately")
    return images


def read_image(path: Path) -> torch.Tensor:
    """An image file as ``uint8`` RGB ``(3, H, W)``; an unreadable file is a one-line error."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise SandboxError(f"image {path} could not be read: {error}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
