"""``cutmix_box = "unimatch"`` draws the boxes of UniMatch's ``obtain_cutmix_box``.

The reference below is a transcription of ``obtain_cutmix_box`` in UniMatch's
``dataset/transform.py`` (github.com/LiheYoung/UniMatch), with numpy's and Python's random
generators as there; it returns the box ``(top, left, height, width)`` (or ``None`` when the
sample is not mixed) instead of the mask ``mask[y:y + cutmix_h, x:x + cutmix_w] = 1``.

Two samples of ``N`` draws are compared (fixed seeds, so the test is deterministic; with a fresh
pair of seeds each check below would fail about once in 2 million runs, 5 standard deviations):

* quantiles: our ``q``-quantile must lie between the reference's ``q - d`` and ``q + d``
  quantiles, ``d = 5 * sqrt(2 q (1 - q) / N)`` (5 standard deviations of the difference of two
  empirical CDFs at the reference's quantile; no assumption about the distribution's shape):
  d = 0.015, 0.022, 0.025, 0.022, 0.015 at 10/25/50/75/90% for N = 20 000;
* a proportion (taller than wide; mixed): within ``5 * sqrt(2 pi (1 - pi) / N)`` of the
  reference's (0.022 for 73%; 0.025 for 50%).
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch

from sandbox.train.cutmix import MAX_ATTEMPTS, cutmix_boxes, draw_box

N = 20_000
CROP = 321  # UniMatch's crop on Pascal VOC
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)


def obtain_cutmix_box(img_size, p=0.5, size_min=0.02, size_max=0.4, ratio_1=0.3, ratio_2=1 / 0.3, *, py_random, np_random):
    """UniMatch's ``obtain_cutmix_box``, transcribed: ``random`` -> ``py_random``, ``np.random`` -> ``np_random``."""
    if py_random.random() > p:
        return None

    size = np_random.uniform(size_min, size_max) * img_size * img_size
    while True:
        ratio = np_random.uniform(ratio_1, ratio_2)
        cutmix_w = int(np.sqrt(size / ratio))
        cutmix_h = int(np.sqrt(size * ratio))
        x = np_random.randint(0, img_size)
        y = np_random.randint(0, img_size)

        if x + cutmix_w <= img_size and y + cutmix_h <= img_size:
            break

    return y, x, cutmix_h, cutmix_w


def reference_boxes(count: int, p: float, seed: int) -> list[tuple[int, int, int, int] | None]:
    py_random, np_random = random.Random(seed), np.random.RandomState(seed)
    return [obtain_cutmix_box(CROP, p, py_random=py_random, np_random=np_random) for _ in range(count)]


@pytest.fixture(scope="module")
def samples() -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    ours = np.array([draw_box(CROP, CROP, generator) for _ in range(N)], dtype=float)
    reference = np.array(reference_boxes(N, 1.0, seed=0), dtype=float)
    return {"ours": ours, "reference": reference}


def tolerance(q: float) -> float:
    return 5 * math.sqrt(2 * q * (1 - q) / N)


def statistics(boxes: np.ndarray) -> dict[str, np.ndarray]:
    height, width = boxes[:, 2], boxes[:, 3]
    return {"height / width": height / width, "area fraction": height * width / CROP**2}


@pytest.mark.parametrize("statistic", ["height / width", "area fraction"])
def test_quantiles_match_the_reference(samples: dict[str, np.ndarray], statistic: str) -> None:
    ours, reference = statistics(samples["ours"])[statistic], statistics(samples["reference"])[statistic]
    for q in QUANTILES:
        low, high = np.quantile(reference, [q - tolerance(q), q + tolerance(q)])
        assert low <= np.quantile(ours, q) <= high, (
            f"{statistic}: our {q:.0%} quantile {np.quantile(ours, q):.3f}, the reference's "
            f"{np.quantile(reference, q):.3f} (accepted: {low:.3f} to {high:.3f})"
        )


def test_boxes_are_taller_than_wide_as_often_as_the_reference(samples: dict[str, np.ndarray]) -> None:
    ours, reference = (float(np.mean(s[:, 2] > s[:, 3])) for s in (samples["ours"], samples["reference"]))
    assert reference == pytest.approx(0.73, abs=0.02), "the reference is taller than wide about 73% of the time"
    assert abs(ours - reference) <= 5 * math.sqrt(2 * reference * (1 - reference) / N)


def test_boxes_at_the_reference_crop_lie_inside_the_image(samples: dict[str, np.ndarray]) -> None:
    top, left, height, width = samples["ours"].T
    assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
    assert (top + height <= CROP).all() and (left + width <= CROP).all()


def test_probability_of_mixing_matches_the_reference() -> None:
    p = 0.5
    reference = float(np.mean([box is not None for box in reference_boxes(N, p, seed=1)]))
    ours = float(cutmix_boxes(N, 32, 32, p, torch.Generator().manual_seed(1)).flatten(1).any(dim=1).float().mean())
    tolerance = 5 * math.sqrt(2 * p * (1 - p) / N)  # no box at 32 x 32 is empty (the smallest is 2 x 8)
    assert abs(reference - p) <= tolerance / math.sqrt(2) and abs(ours - reference) <= tolerance


@pytest.mark.parametrize("height, width", [(256, 512), (512, 256), (97, 33)])
def test_non_square_crops_draw_boxes_inside_the_image_with_the_same_shape_distribution(height: int, width: int) -> None:
    generator = torch.Generator().manual_seed(2)
    boxes = np.array([draw_box(height, width, generator) for _ in range(2000)], dtype=float)
    top, left, box_h, box_w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + box_h <= height).all() and (left + box_w <= width).all()
    fraction = box_h * box_w / (height * width)
    assert fraction.min() >= 0.02 * 0.8 and fraction.max() <= 0.4, "area: 2-40% of the crop, less int() truncation"
    ratio = box_h / box_w
    assert ratio.min() >= 0.3 * 0.8 and ratio.max() <= 1.25 / 0.3, "aspect: 0.3-3.3, less int() truncation"
    # Both positions are drawn anywhere in the image and rejected unless the box fits.
    assert top.min() == 0 and left.min() == 0 and (top + box_h).max() == height and (left + box_w).max() == width


@pytest.mark.parametrize("height, width", [(32, 512), (1, 1024), (1, 1), (3, 3)])
def test_extreme_crops_terminate_with_boxes_inside_the_image(height: int, width: int) -> None:
    generator = torch.Generator().manual_seed(3)
    start = time.perf_counter()
    boxes = [draw_box(height, width, generator) for _ in range(30)]
    assert time.perf_counter() - start < 10, f"{MAX_ATTEMPTS} attempts at most per box"
    for top, left, box_h, box_w in boxes:
        assert 0 <= top and top + box_h <= height and 0 <= left and left + box_w <= width
    if (height, width) == (1, 1024):  # no box fits (the shortest is 2 px tall): each is clipped to the image
        assert all(box_h == 1 and box_w > 0 for _, _, box_h, box_w in boxes)


def test_same_generator_state_draws_the_same_boxes() -> None:
    first = [draw_box(CROP, CROP, torch.Generator().manual_seed(4)) for _ in range(3)]
    again = [draw_box(CROP, CROP, torch.Generator().manual_seed(4)) for _ in range(3)]
    assert first == again
    generator = torch.Generator().manual_seed(4)
    assert len({draw_box(CROP, CROP, generator) for _ in range(20)}) > 1


def test_flipped_partners_take_from_the_mirrored_sample() -> None:
    """``cutmix_partners = "flipped"``: sample i pastes from sample B-1-i (UniMatch V2's ``flip(0)``)."""
    from sandbox.train.cutmix import apply_cutmix

    values = torch.arange(5.0).view(5, 1, 1).expand(5, 4, 4).clone()
    boxes = torch.zeros(5, 4, 4, dtype=torch.bool)
    boxes[:, :2] = True
    (mixed,) = apply_cutmix(boxes, values, flipped=True)
    assert mixed[:, 0, 0].tolist() == [4.0, 3.0, 2.0, 1.0, 0.0] and mixed[:, 3, 3].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    (rolled,) = apply_cutmix(boxes, values)
    assert rolled[:, 0, 0].tolist() == [4.0, 0.0, 1.0, 2.0, 3.0]
