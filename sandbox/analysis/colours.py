"""Class masks as pictures: a dataset's palette (completed when short), colour masks, overlays."""

from __future__ import annotations

import numpy as np
from PIL import Image

Colour = tuple[int, int, int]
"""An RGB colour, 0..255 per channel."""

PALETTE_ENTRIES = 256
"""Colours in a PIL "P" image palette (class ids are 8-bit pixel values)."""

IGNORE_COLOUR: Colour = (255, 255, 255)
"""Colour of pixels without a label (the dataset's ignore index)."""

OVERLAY_ALPHA = 0.5
"""Weight of the class colours in an overlay (the image gets the rest)."""


def bit_colour(index: int) -> Colour:
    """The ``index``-th colour of the PASCAL VOC colour map (bits of the index spread over RGB)."""
    red = green = blue = 0
    for shift in range(7, -1, -1):
        red |= ((index >> 0) & 1) << shift
        green |= ((index >> 1) & 1) << shift
        blue |= ((index >> 2) & 1) << shift
        index >>= 3
    return red, green, blue


def full_palette(palette: list[Colour] | list[list[int]], num_classes: int) -> list[Colour]:
    """The dataset's palette, completed with VOC colours where it has fewer than ``num_classes``."""
    colours = [tuple(int(channel) for channel in colour) for colour in palette[:num_classes]]
    return [*colours, *(bit_colour(index) for index in range(len(colours), num_classes))]  # type: ignore[list-item]


def colourize(mask: np.ndarray, palette: list[Colour], ignore_index: int | None = None) -> np.ndarray:
    """Class ids ``(H, W)`` to RGB ``uint8`` ``(H, W, 3)``; ignored and unknown ids in white."""
    table = np.array([*palette, *([IGNORE_COLOUR] * (PALETTE_ENTRIES - len(palette)))], dtype=np.uint8)
    ids = np.where((mask >= 0) & (mask < len(palette)), mask, len(palette)).astype(np.int64)
    if ignore_index is not None:
        ids = np.where(mask == ignore_index, len(palette), ids)
    return table[np.minimum(ids, PALETTE_ENTRIES - 1)]


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend an RGB image and a colour mask of the same size (``uint8``)."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def palette_image(mask: np.ndarray, palette: list[Colour]) -> Image.Image:
    """A PIL "P" image whose pixel values are the class ids and whose palette is ``palette``."""
    if len(palette) > PALETTE_ENTRIES:
        raise ValueError(f"{len(palette)} classes do not fit an 8-bit palette image")
    pixels = np.ascontiguousarray(mask, dtype=np.uint8)
    image = Image.frombytes("P", (pixels.shape[1], pixels.shape[0]), pixels.tobytes())
    flat = [channel for colour in palette for channel in colour]
    image.putpalette(flat + [0] * (3 * PALETTE_ENTRIES - len(flat)))
    return image
