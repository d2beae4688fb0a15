"""CutMix between images of a batch, applied identically to images and their targets."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


def cutmix_boxes(
    batch: int,
    height: int,
    width: int,
    p: float,
    generator: torch.Generator,
    box: Literal["unimatch", "half"] = "unimatch",
    decision: Literal["sample", "batch"] = "sample",
) -> Tensor:
    """Boolean masks ``(batch, H, W)``, True where a sample takes its partner's pixels.

    ``box``: ``"unimatch"`` draws a box of area 2%-40% and aspect 0.3-3.3 (UniMatch's);
    ``"half"`` one of exactly half the image, width uniform in (W/2, W) (DDFP's reference code,
    from U2PL). ``decision``: with probability ``p`` each sample is mixed (``"sample"``), or the
    whole batch is mixed or not (``"batch"``, the reference's single draw per step).
    """
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    if decision == "batch" and torch.rand((), generator=generator) >= p:
        return masks
    for i in range(batch):
        if decision == "sample" and torch.rand((), generator=generator) >= p:
            continue
        box_h, box_w = (_unimatch_box if box == "unimatch" else _half_box)(height, width, generator)
        top = int(torch.randint(0, height - box_h + 1, (), generator=generator))
        left = int(torch.randint(0, width - box_w + 1, (), generator=generator))
        masks[i, top : top + box_h, left : left + box_w] = True
    return masks


def _unimatch_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int]:
    """Height and width of a box of area 2%-40% and aspect ratio 0.3-3.3."""
    area = height * width * float(torch.empty(()).uniform_(0.02, 0.4, generator=generator))
    ratio = math.exp(float(torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator)))
    return min(height, int(round(math.sqrt(area / ratio)))), min(width, int(round(math.sqrt(area * ratio))))


def _half_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int]:
    """Height and width of a box of half the image area, width uniform in (W/2, W)."""
    box_w = int(torch.randint(width // 2 + 1, max(width, width // 2 + 2), (), generator=generator))
    return min(height, int(round(height * width / 2 / box_w))), box_w


def paste(boxes: Tensor, tensor: Tensor, partner: Tensor) -> Tensor:
    """``tensor`` with each sample's box taken from the same sample of ``partner``.

    ``boxes`` is ``(B, H, W)``; ``tensor`` and ``partner`` are ``(B, ..., H, W)`` of any dtype.
    """
    box = boxes.to(tensor.device).view(boxes.shape[0], *([1] * (tensor.dim() - 3)), *boxes.shape[1:])
    return torch.where(box, partner, tensor)


def apply_cutmix(boxes: Tensor, *tensors: Tensor) -> list[Tensor]:
    """Paste each sample's box from the next sample of the batch (roll by one), in every tensor."""
    return [paste(boxes, tensor, tensor.roll(1, dims=0)) for tensor in tensors]
