"""CutMix between images of a batch, applied identically to images and their targets."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from sandbox.host_side import host_side, to_device

#: UniMatch's ``obtain_cutmix_box`` (``dataset/transform.py``): area fraction and height/width ratio.
UNIMATCH_AREA = (0.02, 0.4)
UNIMATCH_RATIO = (0.3, 1 / 0.3)
#: Attempts of the ``"unimatch"`` box before it is clipped to the image (see :func:`draw_box`).
MAX_ATTEMPTS = 1000
_ATTEMPTS_PER_DRAW = 16


BoxKind = Literal["unimatch", "half"]
"""The distribution of a CutMix box (see :func:`draw_box`)."""
Decision = Literal["sample", "batch"]
"""Whether each sample is mixed by its own draw, or the whole batch by one (see :func:`draw_boxes`)."""


def cutmix_boxes(batch: int, height: int, width: int, p: float, generator: torch.Generator, box: BoxKind = "unimatch",
                 decision: Decision = "sample", device: torch.device | str = "cpu") -> Tensor:
    """Boolean masks ``(batch, H, W)`` on ``device``, True where a sample takes its partner's pixels.

    The boxes are drawn in host memory (:func:`draw_boxes`), the masks made on the device from
    their corners: nothing waits for the device.
    """
    corners = draw_boxes(batch, height, width, p, generator, box, decision)
    return box_masks(to_device(corners, torch.device(device)), height, width)


@host_side
def draw_boxes(batch: int, height: int, width: int, p: float, generator: torch.Generator, box: BoxKind = "unimatch",
               decision: Decision = "sample") -> Tensor:
    """``(batch, 4)`` int64 ``(top, left, box height, box width)`` of each sample's box (0 x 0: not mixed).

    ``box``: the box's distribution, see :func:`draw_box` (``"unimatch"``: UniMatch's;
    ``"half"``: DDFP's reference code's). ``decision``: with probability ``p`` each sample is
    mixed (``"sample"``, UniMatch's), or the whole batch is mixed or not (``"batch"``, DDFP's
    reference: a single draw per step). Every draw comes from ``generator`` (a CPU generator).
    """
    corners = torch.zeros(batch, 4, dtype=torch.int64)
    if decision == "batch" and torch.rand((), generator=generator) >= p:
        return corners
    for i in range(batch):
        if decision == "sample" and torch.rand((), generator=generator) >= p:
            continue
        corners[i] = torch.tensor(draw_box(height, width, generator, box))
    return corners


def box_masks(corners: Tensor, height: int, width: int) -> Tensor:
    """Boolean masks ``(B, H, W)`` on ``corners``' device, True inside each ``(top, left, h, w)`` box."""
    top, left, box_h, box_w = (column.view(-1, 1) for column in corners.unbind(dim=1))
    rows = torch.arange(height, device=corners.device).view(1, -1)
    columns = torch.arange(width, device=corners.device).view(1, -1)
    inside_rows = (rows >= top) & (rows < top + box_h)
    inside_columns = (columns >= left) & (columns < left + box_w)
    return inside_rows[:, :, None] & inside_columns[:, None, :]


@host_side
def draw_box(height: int, width: int, generator: torch.Generator, box: BoxKind = "unimatch") -> tuple[int, int, int, int]:
    """``(top, left, box height, box width)`` of one CutMix box inside a ``height x width`` image.

    ``"unimatch"``: UniMatch's ``obtain_cutmix_box``, for an ``H x W`` crop (UniMatch's crops are
    square). The area is a fraction of ``H * W`` drawn uniformly in 2%-40%, once; then, until
    the box fits, the ratio ``r`` = height / width is drawn uniformly in (0.3, 1/0.3) (so the box
    is taller than wide about 73% of the time, median height/width about 1.5), the box is
    ``int(sqrt(area * r))`` tall and ``int(sqrt(area / r))`` wide (truncated), its top-left corner
    is drawn uniformly among all pixels (``left`` in [0, W), ``top`` in [0, H)), and the attempt
    is rejected unless the box lies inside the image. An attempt fits with probability 72% at an
    area of 2% and 6% at 40% on a square crop (5.7 attempts on average), so on square crops the
    bound of ``MAX_ATTEMPTS`` = 1000 attempts is reached with probability below 1e-26 (0.94^1000):
    never in practice. Crops far from square may never fit a large box (32 x 512 at 40%); after
    ``MAX_ATTEMPTS`` rejected attempts, the last attempt's box is clipped to the image (at most
    ``H`` tall and ``W`` wide) and placed uniformly among the positions where it fits. On crops
    under about 13 x 13 pixels a box can be 0 pixels wide or tall, an empty box, as in the
    reference. Attempts are drawn from ``generator`` 16 at a time and the unused ones discarded:
    the same distribution (the first fitting attempt of independent ones), fewer calls.

    ``"half"``: a box of half the image area, width uniform in (W/2, W), placed uniformly (DDFP's
    reference code, from U2PL).
    """
    if box == "half":
        return _half_box(height, width, generator)
    area = height * width * _uniform(*UNIMATCH_AREA, generator)
    low, high = UNIMATCH_RATIO
    for start in range(0, MAX_ATTEMPTS, _ATTEMPTS_PER_DRAW):  # attempts drawn a few at a time (speed)
        count = min(_ATTEMPTS_PER_DRAW, MAX_ATTEMPTS - start)
        for u_ratio, u_left, u_top in torch.rand(count, 3, dtype=torch.float64, generator=generator).tolist():
            ratio = low + (high - low) * u_ratio
            box_w, box_h = int(math.sqrt(area / ratio)), int(math.sqrt(area * ratio))
            left, top = _integer_below(width, u_left), _integer_below(height, u_top)
            if left + box_w <= width and top + box_h <= height:
                return top, left, box_h, box_w
    box_h, box_w = min(box_h, height), min(box_w, width)
    u_top, u_left = torch.rand(2, dtype=torch.float64, generator=generator).tolist()
    return _integer_below(height - box_h + 1, u_top), _integer_below(width - box_w + 1, u_left), box_h, box_w


@host_side
def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), dtype=torch.float64, generator=generator))


def _integer_below(n: int, u: float) -> int:
    """An integer uniform in [0, n) from ``u`` uniform in [0, 1)."""
    return min(int(u * n), n - 1)


@host_side
def _half_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A box of half the image area, width uniform in (W/2, W), placed uniformly."""
    box_w = int(torch.randint(width // 2 + 1, max(width, width // 2 + 2), (), generator=generator))
    box_h = min(height, int(round(height * width / 2 / box_w)))
    top = int(torch.randint(0, height - box_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - box_w + 1, (), generator=generator))
    return top, left, box_h, box_w


def paste(boxes: Tensor, tensor: Tensor, partner: Tensor) -> Tensor:
    """``tensor`` with each sample's box taken from the same sample of ``partner``.

    ``boxes`` is ``(B, H, W)``; ``tensor`` and ``partner`` are ``(B, ..., H, W)`` of any dtype.
    """
    box = boxes.to(tensor.device).view(boxes.shape[0], *([1] * (tensor.dim() - 3)), *boxes.shape[1:])
    return torch.where(box, partner, tensor)


def apply_cutmix(boxes: Tensor, *tensors: Tensor, flipped: bool = False) -> list[Tensor]:
    """Paste each sample's box from the next sample of the batch (roll by one: DDFP), or with
    ``flipped`` from the sample at the mirrored position (sample i from sample B-1-i: UniMatch V2's
    ``flip(0)``), in every tensor."""
    return [paste(boxes, tensor, tensor.flip(0) if flipped else tensor.roll(1, dims=0)) for tensor in tensors]
