"""CutMix between images of a batch, applied identically to images and their targets."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cutmix_boxes(batch: int, height: int, width: int, p: float, generator: torch.Generator) -> Tensor:
    """Boolean masks ``(batch, H, W)``: a random box (area 2%-40%, aspect 0.3-3.3) with probability p."""
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    for i in range(batch):
        if torch.rand((), generator=generator) >= p:
            continue
        area = height * width * float(torch.empty(()).uniform_(0.02, 0.4, generator=generator))
        ratio = math.exp(float(torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator)))
        box_h = min(height, int(round(math.sqrt(area / ratio))))
        box_w = min(width, int(round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, height - box_h + 1, (), generator=generator))
        left = int(torch.randint(0, width - box_w + 1, (), generator=generator))
        masks[i, top : top + box_h, left : left + box_w] = True
    return masks


def apply_cutmix(boxes: Tensor, *tensors: Tensor) -> list[Tensor]:
    """Paste each sample's box from the next sample of the batch (roll by one), in every tensor.

    ``boxes`` is ``(B, H, W)``; tensors are ``(B, ..., H, W)`` of any dtype.
    """
    mixed = []
    for tensor in tensors:
        box = boxes.to(tensor.device).view(boxes.shape[0], *([1] * (tensor.dim() - 3)), *boxes.shape[1:])
        mixed.append(torch.where(box, tensor.roll(1, dims=0), tensor))
    return mixed
