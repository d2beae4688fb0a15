"""Tests of the training/evaluation views and the resumable stream sampler."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from sandbox_builtins.shapes_dataset import make_shapes_dataset
from sandbox.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalSet,
    LabeledTrainSet,
    StreamSampler,
    UnlabeledTrainSet,
    denormalize,
    normalize,
)

IGNORE = 255


def take(sampler: StreamSampler, count: int) -> list[tuple[int, int]]:
    """The first ``count`` items of an endless sampler."""
    return list(itertools.islice(iter(sampler), count))


def random_sample(height: int, width: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random uint8 image and a mask of classes 0..3 (no ignore pixels)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    mask = torch.randint(0, 4, (height, width), generator=generator)
    return image, mask


def smooth_gray(height: int, width: int, seed: int = 0) -> Tensor:
    """A smooth, asymmetric grayscale uint8 image in [60, 190] (colour jitter stays monotone on it)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 5, 5, generator=generator)
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0, 0]
    field = (field - field.min()) / (field.max() - field.min())
    return (60 + 130 * field).round().to(torch.uint8).expand(3, -1, -1).clone()


# -- sampler --------------------------------------------------------------------------------------


def test_sampler_epochs_are_permutations() -> None:
    stream = take(StreamSampler(7, seed=3), 21)
    assert [position for _, position in stream] == list(range(21))
    epochs = [[index for index, _ in stream[e * 7 : (e + 1) * 7]] for e in range(3)]
    assert all(sorted(epoch) == list(range(7)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1
    assert epochs[1] == [index for index, _ in take(StreamSampler(7, seed=4), 7)], "epoch e is seeded with seed + e"


def test_sampler_resume_reproduces_the_tail() -> None:
    full = take(StreamSampler(5, seed=0), 40)
    for start in (0, 3, 5, 17):
        assert take(StreamSampler(5, seed=0, start_position=start), 40 - start) == full[start:]


def test_sampler_ranks_partition_positions() -> None:
    full = take(StreamSampler(6, seed=1), 60)
    for start in (0, 7):
        shards = [take(StreamSampler(6, seed=1, start_position=start, num_replicas=3, rank=r), 15) for r in range(3)]
        for rank, shard in enumerate(shards):
            assert all(position % 3 == rank and position >= start for _, position in shard)
            assert all(full[position] == (index, position) for index, position in shard if position < 60)
        positions = sorted(position for shard in shards for _, position in shard)
        assert positions == sorted(set(positions)) and positions[: 60 - start - 15] == list(range(start, 45))


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        StreamSampler(0, seed=0)
    with pytest.raises(ValueError):
        StreamSampler(4, seed=0, num_replicas=2, rank=2)


# -- normalisation --------------------------------------------------------------------------------


def test_normalize_and_denormalize() -> None:
    images, _ = random_sample(8, 9)
    normalised = normalize(images)
    assert normalised.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    torch.testing.assert_close(normalised, expected)
    assert torch.equal(denormalize(normalised), images)
    assert normalize(images[None].expand(2, -1, -1, -1)).shape == (2, 3, 8, 9)


# -- training views -------------------------------------------------------------------------------


def test_labeled_view_shapes_and_determinism() -> None:
    samples = [random_sample(40, 50, seed) for seed in range(3)]
    dataset = LabeledTrainSet(samples, crop_size=32, scale_range=(0.5, 2.0), seed=0)
    image, mask = dataset[(1, 10)]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert mask.dtype == torch.int64 and mask.shape == (32, 32)
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, IGNORE}
    again_image, again_mask = dataset[(1, 10)]
    assert torch.equal(image, again_image) and torch.equal(mask, again_mask)
    others = [dataset[(1, position)][0] for position in range(11, 15)]
    assert not any(torch.equal(image, other) for other in others)
    assert not torch.equal(image, LabeledTrainSet(samples, 32, (0.5, 2.0), seed=1)[(1, 10)][0])


def test_views_leave_the_global_rng_untouched() -> None:
    image, mask = random_sample(40, 40)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    LabeledTrainSet([(image, mask)], 32, (0.5, 2.0), seed=0)[(0, 3)]
    UnlabeledTrainSet([image], 32, (0.5, 2.0), seed=0)[(0, 3)]
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(numpy_state, np.random.get_state()[1])


def test_padding_is_ignore_when_crop_exceeds_image() -> None:
    image, mask = random_sample(32, 48)
    crop = 64
    labeled_image, labeled_mask = LabeledTrainSet([(image, mask)], crop, (1.0, 1.0), seed=0)[(0, 5)]
    padded = labeled_mask == IGNORE
    assert int(padded.sum()) == crop * crop - 32 * 48
    black = normalize(torch.zeros(3, 1, 1, dtype=torch.uint8)).view(3, 1)
    assert torch.equal(labeled_image[:, padded], black.expand(-1, int(padded.sum())))
    weak, _, ignore = UnlabeledTrainSet([image], crop, (1.0, 1.0), seed=0)[(0, 5)]
    assert ignore.dtype == torch.bool and torch.equal(ignore, padded), "same seed and position, same geometry"
    assert torch.equal(weak, labeled_image)


def test_scale_is_relative_to_the_image_size() -> None:
    image, mask = random_sample(40, 60)
    for position in range(3):
        _, labeled_mask = LabeledTrainSet([(image, mask)], 96, (0.5, 0.5), seed=0)[(0, position)]
        assert int((labeled_mask != IGNORE).sum()) == 20 * 30


def test_unlabeled_padding_matches_labeled_geometry_under_random_scale() -> None:
    image, mask = random_sample(36, 44)
    labeled = LabeledTrainSet([(image, mask)], 48, (0.5, 2.0), seed=7)
    unlabeled = UnlabeledTrainSet([image], 48, (0.5, 2.0), seed=7)
    for position in range(8):
        labeled_image, labeled_mask = labeled[(0, position)]
        weak, strong, ignore = unlabeled[(0, position)]
        assert weak.shape == strong.shape == (3, 48, 48) and ignore.shape == (48, 48)
        assert torch.equal(weak, labeled_image) and torch.equal(ignore, labeled_mask == IGNORE)


def test_strong_view_shares_the_weak_geometry() -> None:
    """On a gray image colour jitter is monotone, so unclipped strong pixels track the weak ones."""
    image = smooth_gray(56, 72)
    dataset = UnlabeledTrainSet([image], 48, (1.0, 1.6), seed=0)  # no padding to blur into
    changed = checked = 0
    for position in range(24):
        weak, strong, ignore = dataset[(0, position)]
        changed += not torch.equal(weak, strong)
        strong_pixels = denormalize(strong)
        unclipped = ((strong_pixels > 0) & (strong_pixels < 255)).all(0)
        keep = ~ignore & unclipped
        if keep.float().mean() < 0.25:
            continue
        checked += 1
        weak_gray, strong_gray = weak.mean(0)[keep], strong.mean(0)[keep]
        correlation = torch.corrcoef(torch.stack([weak_gray, strong_gray]))[0, 1]
        assert correlation > 0.97, f"position {position}: weak/strong correlation {correlation:.3f}"
    assert checked >= 18 and changed >= 18, "the strong view should usually differ in colour"
    dataset.strong_transform = v2.Identity()
    weak, strong, _ = dataset[(0, 3)]
    assert torch.equal(weak, strong)


def test_strong_view_geometry_check_is_sensitive_to_misalignment() -> None:
    """Control for the test above: a flipped weak view does not correlate with the strong view."""
    image = smooth_gray(56, 72)
    weak, strong, ignore = UnlabeledTrainSet([image], 48, (1.0, 1.0), seed=0)[(0, 1)]
    assert not ignore.any()
    flipped = torch.corrcoef(torch.stack([weak.mean(0).flip(-1).flatten(), strong.mean(0).flatten()]))[0, 1]
    assert flipped < 0.9


@pytest.mark.parametrize("labeled", [True, False])
def test_dataloader_workers_do_not_change_batches(labeled: bool) -> None:
    source = make_shapes_dataset(num_labeled=6, num_unlabeled=6, num_val=1, image_size=40)
    if labeled:
        dataset = LabeledTrainSet(source.labeled, 32, (0.5, 2.0), seed=2)
    else:
        dataset = UnlabeledTrainSet(source.unlabeled, 32, (0.5, 2.0), seed=2)

    def batches(workers: int) -> list[list[Tensor]]:
        sampler = StreamSampler(6, seed=2, start_position=3)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)
        return list(itertools.islice(iter(loader), 3))

    serial, parallel = batches(0), batches(2)
    for batch_a, batch_b in zip(serial, parallel, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(batch_a, batch_b, strict=True))


# -- evaluation view ------------------------------------------------------------------------------


def test_eval_whole_keeps_the_image() -> None:
    image, mask = random_sample(30, 41)
    out_image, out_mask = EvalSet([(image, mask)])[0]
    assert torch.equal(out_image, normalize(image)) and torch.equal(out_mask, mask)
    assert out_mask.dtype == torch.int64


def test_eval_center_crop_crops_and_pads() -> None:
    image, mask = random_sample(30, 40)
    cropped_image, cropped_mask = EvalSet([(image, mask)], "center_crop", 20)[0]
    assert torch.equal(cropped_mask, mask[5:25, 10:30]) and torch.equal(cropped_image, normalize(image[:, 5:25, 10:30]))
    padded_image, padded_mask = EvalSet([(image, mask)], "center_crop", 50)[0]
    assert padded_image.shape == (3, 50, 50) and int((padded_mask == IGNORE).sum()) == 50 * 50 - 30 * 40
    assert torch.equal(padded_mask[10:40, 5:45], mask)


def test_eval_rejects_bad_mode() -> None:
    with pytest.raises(ValueError):
        EvalSet([], "sliding")
    with pytest.raises(ValueError):
        EvalSet([], "center_crop", None)
