"""The ``shapes`` dataset: textured shapes on textured backgrounds, generated on the fly.

Nothing is downloaded or stored: image ``index`` of a part is drawn from a NumPy generator seeded
with ``(seed, part, index)``, so it is the same every time it is asked for, whatever was asked
before, and the three parts never share an image.

Five classes: ``background`` and four shapes (``disc``, ``square``, ``triangle``, ``ring``).
Each shape class has a characteristic texture (disc: horizontal stripes, square: vertical
stripes, triangle: a checkerboard, ring: a diagonal cross-hatch) in colours jittered around a
class hue, with orientation, period, saturation and brightness jittered per shape. Backgrounds
are smooth blends of two random colours, sometimes with faint stripes of random orientation, so
neither colour nor "is striped" alone separates the classes. Every image holds one to four
shapes of random class, size, rotation and position; later shapes occlude earlier ones and the
mask follows. Masks carry no ignore (255) pixels: every pixel is labeled.
"""

from __future__ import annotations

import colorsys
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from sandbox.api import IGNORE_INDEX, Register, SegmentationSource, hookimpl

CLASS_NAMES = ["background", "disc", "square", "triangle", "ring"]
"""Class names, index 0 being the background."""

PALETTE = [(0, 0, 0), (230, 25, 75), (145, 200, 30), (0, 170, 190), (145, 30, 180)]
"""RGB colour of each class for colourised masks."""

PARTS = {"labeled": 0, "unlabeled": 1, "val": 2}
"""Part name -> the number mixed into each image's seed (keeps the parts disjoint)."""

Part = Literal["labeled", "unlabeled", "val"]


@dataclass(frozen=True)
class ClassStyle:
    """How one shape class looks: hue (0..1), texture kind, orientation (deg) and period (fraction of size)."""

    hue: float
    texture: Literal["stripes", "checker", "crosshatch"]
    angle: float
    period: float


STYLES = {
    1: ClassStyle(hue=0.0, texture="stripes", angle=90.0, period=0.10),
    2: ClassStyle(hue=0.25, texture="stripes", angle=0.0, period=0.10),
    3: ClassStyle(hue=0.5, texture="checker", angle=0.0, period=0.14),
    4: ClassStyle(hue=0.75, texture="crosshatch", angle=45.0, period=0.11),
}
"""Style of each shape class (key = class index)."""

HUE_JITTER = 0.16
"""Maximum shift of a shape's hue from its class hue (fraction of the colour wheel)."""


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """RGB in [0, 1] of an HSV colour, as a ``(3, 1, 1)`` float32 array for broadcasting."""
    return np.asarray(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32).reshape(3, 1, 1)


def _wave(xx: np.ndarray, yy: np.ndarray, angle_deg: float, period: float, phase: float) -> np.ndarray:
    """A sharpened sinusoid in [-1, 1] varying along direction ``angle_deg`` with ``period`` pixels."""
    angle = math.radians(angle_deg)
    scale = 2.0 * math.pi / period
    argument = xx * (math.cos(angle) * scale) + yy * (math.sin(angle) * scale) + phase
    return np.clip(2.0 * np.sin(argument), -1.0, 1.0)


class ShapesPart(Sequence):
    """One part of the shapes dataset: a lazily generated, deterministic sequence of samples.

    ``part`` ``"unlabeled"`` yields image tensors; ``"labeled"`` and ``"val"`` yield
    ``(image, mask)`` pairs. Images are ``uint8`` ``(3, S, S)``, masks ``int64`` ``(S, S)``.
    """

    def __init__(self, part: Part, length: int, image_size: int, seed: int) -> None:
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; expected one of {sorted(PARTS)}")
        if length < 0:
            raise ValueError(f"part {part!r} length must be >= 0, got {length}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.part = part
        self.length = length
        self.image_size = image_size
        self.seed = seed
        centres = np.arange(image_size, dtype=np.float32) + 0.5
        self._yy, self._xx = np.meshgrid(centres, centres, indexing="ij")

    def __len__(self) -> int:
        """Number of samples in the part."""
        return self.length

    @overload
    def __getitem__(self, index: int) -> Tensor | tuple[Tensor, Tensor]: ...

    @overload
    def __getitem__(self, index: slice) -> list[Tensor | tuple[Tensor, Tensor]]: ...

    def __getitem__(self, index: int | slice) -> Tensor | tuple[Tensor, Tensor] | list[Tensor | tuple[Tensor, Tensor]]:
        """Sample ``index``: an image (unlabeled part) or an ``(image, mask)`` pair."""
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.length))]
        position = operator.index(index)
        if position < 0:
            position += self.length
        if not 0 <= position < self.length:
            raise IndexError(f"index {index} out of range for {self.part} part of length {self.length}")
        image, mask = self.render(position)
        return image if self.part == "unlabeled" else (image, mask)

    def render(self, index: int) -> tuple[Tensor, Tensor]:
        """Generate image ``index`` of this part and its mask (also for the unlabeled part)."""
        rng = np.random.default_rng([self.seed, PARTS[self.part], index])
        size = self.image_size
        image = self._background(rng)
        mask = np.zeros((size, size), dtype=np.int64)
        for _ in range(int(rng.integers(1, 5))):
            label = int(rng.integers(1, len(CLASS_NAMES)))
            inside = self._shape_region(rng, label)
            texture = self._texture(rng, label)
            image = np.where(inside, texture, image)
            mask[inside] = label
        noise = rng.standard_normal((3, size, size), dtype=np.float32) * np.float32(0.025)
        pixels = np.clip((image + noise) * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
        return torch.from_numpy(pixels), torch.from_numpy(mask)

    # -- pieces -----------------------------------------------------------------------------------

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A smooth blend of two random colours, sometimes with faint random stripes, ``(3, S, S)``."""
        size = self.image_size
        hue = rng.random()
        first = _hsv(hue, rng.uniform(0.0, 0.6), rng.uniform(0.25, 0.9))
        second = _hsv(hue + rng.uniform(-0.25, 0.25), rng.uniform(0.0, 0.6), rng.uniform(0.25, 0.9))
        grid = int(rng.integers(3, 7))
        coarse = torch.from_numpy(rng.random((1, 1, grid, grid), dtype=np.float32))
        field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
        blend = np.clip(field[0].numpy(), 0.0, 1.0)
        background = first + (second - first) * blend
        if rng.random() < 0.4:
            stripes = _wave(
                self._xx, self._yy, rng.uniform(0.0, 180.0), size * rng.uniform(0.06, 0.2), rng.uniform(0, 2 * math.pi)
            )
            background = background * (1.0 + np.float32(rng.uniform(0.08, 0.2)) * stripes)
        return background.astype(np.float32, copy=False)

    def _shape_region(self, rng: np.random.Generator, label: int) -> np.ndarray:
        """Boolean ``(S, S)`` region of a randomly placed, sized and rotated shape of class ``label``."""
        size = self.image_size
        radius = size * rng.uniform(0.11, 0.24)
        cx, cy = size * rng.uniform(0.1, 0.9, size=2)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        dx, dy = self._xx - np.float32(cx), self._yy - np.float32(cy)
        cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        name = CLASS_NAMES[label]
        if name == "disc":
            return u * u + v * v <= radius * radius
        if name == "square":
            half = radius * 0.82
            return np.maximum(np.abs(u), np.abs(v)) <= half
        if name == "triangle":
            inradius = radius * 1.2 / 2.0
            inside = np.ones_like(u, dtype=bool)
            for k in range(3):
                normal = math.pi / 2 + k * 2.0 * math.pi / 3.0
                inside &= u * np.float32(math.cos(normal)) + v * np.float32(math.sin(normal)) <= inradius
            return inside
        if name == "ring":
            outer = radius * 1.05
            squared = u * u + v * v
            return (squared <= outer * outer) & (squared >= (0.5 * outer) ** 2)
        raise ValueError(f"no shape for class {label}")

    def _texture(self, rng: np.random.Generator, label: int) -> np.ndarray:
        """Full-frame ``(3, S, S)`` texture of class ``label`` with per-shape jitter."""
        style = STYLES[label]
        hue = style.hue + rng.uniform(-HUE_JITTER, HUE_JITTER)
        saturation, value = rng.uniform(0.45, 0.95), rng.uniform(0.55, 1.0)
        light = _hsv(hue, saturation, value)
        dark = _hsv(hue + rng.uniform(-0.03, 0.03), saturation * rng.uniform(0.7, 1.0), value * rng.uniform(0.35, 0.6))
        angle = style.angle + rng.uniform(-18.0, 18.0)
        period = self.image_size * style.period * rng.uniform(0.8, 1.25)
        phase_a, phase_b = rng.uniform(0.0, 2.0 * math.pi, size=2)
        xx, yy = self._xx, self._yy
        if style.texture == "stripes":
            wave = _wave(xx, yy, angle, period, phase_a)
        elif style.texture == "checker":
            product = _wave(xx, yy, angle, period, phase_a) * _wave(xx, yy, angle + 90.0, period, phase_b)
            wave = np.clip(2.0 * product, -1.0, 1.0)
        else:
            first = _wave(xx, yy, angle, period, phase_a)
            second = _wave(xx, yy, angle + 90.0, period, phase_b)
            wave = np.maximum(first, second)
        weight = wave * np.float32(0.5) + np.float32(0.5)
        return light + (dark - light) * weight


def make_shapes_dataset(
    num_labeled: int = 64,
    num_unlabeled: int = 512,
    num_val: int = 48,
    image_size: int = 96,
    seed: int = 0,
) -> SegmentationSource:
    """Generated textured shapes (disc, square, triangle, ring) on textured backgrounds; no download.

    Images are generated on demand from ``(seed, part, index)``; see the module docstring.
    """
    return SegmentationSource(
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        labeled=ShapesPart("labeled", num_labeled, image_size, seed),
        unlabeled=ShapesPart("unlabeled", num_unlabeled, image_size, seed),
        val=ShapesPart("val", num_val, image_size, seed),
        ignore_index=IGNORE_INDEX,
        palette=list(PALETTE),
    )


@hookimpl
def sandbox_register_datasets(register: Register) -> None:
    """Register the generated ``shapes`` dataset."""
    register("shapes", make_shapes_dataset)
