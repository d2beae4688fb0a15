"""Training and evaluation views of a :class:`sandbox.api.SegmentationSource`, and the stream sampler.

Training sets are indexed by ``(index, position)`` pairs from :class:`StreamSampler`: ``index``
picks the sample, ``position`` (its place in the endless stream) seeds all of its augmentation
randomness. The augmentation runs under a forked torch RNG seeded from ``(seed, position)``, so
the caller's global RNG is never touched and the output is bit-identical whatever the number of
DataLoader workers and whatever was drawn before.

Geometry is applied by ``torchvision.transforms.v2`` to ``tv_tensors.Image`` and
``tv_tensors.Mask`` together (masks are resized nearest-neighbour). Scaling is relative to each
image's own size; images smaller than the crop are padded on the bottom/right (image with 0,
mask with the ignore index) before the random crop, as in UniMatch.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sandbox.api import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB images in [0, 1]."""

IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB images in [0, 1]."""

BLUR_SIGMA = (0.1, 2.0)
"""Range of the strong view's Gaussian blur sigma (pixels)."""

BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1
"""Gaussian blur kernel size: three sigmas of the largest sigma either side."""

_AUGMENT_SALT = 0x5EED_A06
"""Mixed into per-sample seeds so they differ from the sampler's permutation seeds."""


def normalize(images_uint8: Tensor) -> Tensor:
    """``uint8`` images ``(..., 3, H, W)`` to float32 normalised with the ImageNet mean and std."""
    images = TF.to_dtype(images_uint8.as_subclass(Tensor), torch.float32, scale=True)
    return TF.normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD))


def denormalize(images: Tensor) -> Tensor:
    """Inverse of :func:`normalize`: float images ``(..., 3, H, W)`` back to ``uint8``."""
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return ((images * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def sample_seed(seed: int, position: int) -> int:
    """The 63-bit torch seed of the augmentation of stream ``position`` under ``seed``."""
    entropy = [seed % 2**64, position % 2**64, _AUGMENT_SALT]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------


class StreamSampler(Sampler[tuple[int, int]]):
    """Endless stream of ``(index, position)``: epoch ``e`` is a permutation of ``range(n)`` drawn
    from ``seed + e`` (a ``torch.Generator``); ``position`` is the global index in the stream.

    Starting at ``start_position`` resumes the exact same stream. With ``num_replicas``/``rank``,
    this process takes the positions ``p >= start_position`` with ``p % num_replicas == rank``.
    """

    def __init__(
        self, dataset_size: int, seed: int, start_position: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if dataset_size < 1:
            raise ValueError(f"StreamSampler needs a non-empty dataset, got size {dataset_size}")
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} of {num_replicas} replicas")
        self.dataset_size = dataset_size
        self.seed = seed
        self.start_position = start_position
        self.num_replicas = num_replicas
        self.rank = rank

    def permutation(self, epoch: int) -> list[int]:
        """The order of the dataset in ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yield ``(index, position)`` for this rank's positions, forever."""
        offset = (self.rank - self.start_position) % self.num_replicas
        position = self.start_position + offset
        epoch, order = -1, []
        while True:
            current = position // self.dataset_size
            if current != epoch:
                epoch, order = current, self.permutation(current)
            yield order[position % self.dataset_size], position
            position += self.num_replicas


class MicroBatchStreamSampler(StreamSampler):
    """The stream of an ``num_replicas * micro_batches``-process run, read by ``num_replicas`` processes
    that each accumulate ``micro_batches`` micro-batches of ``batch_size`` per optimizer step.

    Micro-batch ``k`` of step ``s`` on process ``r`` holds exactly the positions that process
    ``r * micro_batches + k`` of the larger run holds at step ``s``: ``(s * batch_size + j) * world +
    r * micro_batches + k`` for ``j < batch_size``, ``world = num_replicas * micro_batches`` (a
    :class:`StreamSampler` rank of that run). The same images with the same augmentation (seeded by
    position); a DataLoader of ``batch_size`` cuts the stream into the micro-batches in order. With
    ``micro_batches = 1`` it yields what :class:`StreamSampler` yields from ``start_step * batch_size *
    num_replicas``.
    """

    def __init__(
        self, dataset_size: int, seed: int, start_step: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
        micro_batches: int = 1,
    ) -> None:
        if batch_size < 1 or micro_batches < 1 or start_step < 0:
            raise ValueError(f"invalid batch_size {batch_size}, micro_batches {micro_batches} or start_step {start_step}")
        super().__init__(dataset_size, seed, start_step * batch_size * num_replicas * micro_batches, num_replicas, rank)
        self.start_step = start_step
        self.batch_size = batch_size
        self.micro_batches = micro_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yield ``(index, position)`` micro-batch after micro-batch, step after step, forever."""
        world = self.num_replicas * self.micro_batches
        orders: dict[int, list[int]] = {}  # the epochs a step reads (at most two; a micro-batch may straddle them)
        step = self.start_step
        while True:
            for micro_batch in range(self.micro_batches):
                virtual_rank = self.rank * self.micro_batches + micro_batch
                for slot in range(self.batch_size):
                    position = (step * self.batch_size + slot) * world + virtual_rank
                    epoch = position // self.dataset_size
                    if epoch not in orders:
                        orders = {e: o for e, o in orders.items() if e >= epoch - 1}
                        orders[epoch] = self.permutation(epoch)
                    yield orders[epoch][position % self.dataset_size], position
            step += 1


# ----------------------------------------------------------------------------------------------
# Training views
# ----------------------------------------------------------------------------------------------


def small_image_note(image_size: tuple[int, int], crop_size: int, scale_range: tuple[float, float]) -> str | None:
    """What a user should know when an image of ``(H, W)`` cannot fill a crop even at the largest scale.

    Such crops are padded (ignored pixels in the mask): legitimate (UniMatch pads too), but with
    a crop larger than the images most of each crop is padding, usually a mistake in the recipe.
    """
    height, width = image_size
    largest = max(scale_range)
    if min(height, width) * largest >= crop_size:
        return None
    return (
        f"the first labeled image is {height}x{width}, smaller than train.crop_size = {crop_size} even at the largest "
        f"scale ({largest:g}, train.scale_range): crops are padded with ignored pixels"
    )


def weak_geometry(
    image: Tensor, mask: Tensor, crop_size: int, scale_range: tuple[float, float], fill: int
) -> tuple[Tensor, Tensor]:
    """Random rescale (relative to the image's own size), pad-to-crop, random crop and flip.

    ``image`` is ``uint8`` ``(3, H, W)`` and ``mask`` ``(H, W)``; the padding of the mask is
    ``fill``. Draws from the global torch RNG (callers fork it). Returns plain tensors.
    """
    height, width = image.shape[-2:]
    # ScaleJitter's base ratio is min(target[1] / height, target[0] / width): (width, height) gives 1.
    rescale = v2.ScaleJitter(target_size=(width, height), scale_range=scale_range)
    scaled_image, scaled_mask = rescale(tv_tensors.Image(image), tv_tensors.Mask(mask))
    pad_bottom = max(crop_size - scaled_image.shape[-2], 0)
    pad_right = max(crop_size - scaled_image.shape[-1], 0)
    transform = v2.Compose(
        [
            v2.Pad([0, 0, pad_right, pad_bottom], fill={tv_tensors.Image: 0, tv_tensors.Mask: fill}),
            v2.RandomCrop(crop_size),
            v2.RandomHorizontalFlip(p=0.5),
        ]
    )
    out_image, out_mask = transform(scaled_image, scaled_mask)
    return out_image.as_subclass(Tensor), out_mask.as_subclass(Tensor)


def strong_colour_transform() -> v2.Transform:
    """The strong view's photometric augmentation (UniMatch's), applied to a ``uint8`` weak crop."""
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=BLUR_KERNEL, sigma=BLUR_SIGMA)], p=0.5),
        ]
    )


class _SeededView(Dataset, abc.ABC):
    """Base of the training views: runs ``augment`` under a torch RNG forked and seeded per position."""

    seed: int

    @abc.abstractmethod
    def augment(self, index: int) -> Any:
        """The augmented sample ``index``, drawing from the (forked) global torch RNG."""

    def __getitem__(self, key: tuple[int, int]) -> Any:
        """The augmented sample for ``(index, position)``; same key, bit-identical output."""
        index, position = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, int(position)))
            return self.augment(int(index))


class LabeledTrainSet(_SeededView):
    """Weakly augmented labeled samples: ``(image float (3, c, c), mask int64 (c, c))``.

    Crop padding is ``ignore_index`` in the mask (and 0 in the image before normalisation).
    """

    def __init__(
        self,
        samples: Sequence[tuple[Tensor, Tensor]],
        crop_size: int,
        scale_range: tuple[float, float],
        seed: int,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.samples = samples
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.seed = seed
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        """Number of underlying samples."""
        return len(self.samples)

    def augment(self, index: int) -> tuple[Tensor, Tensor]:
        """Weak view of labeled sample ``index``."""
        image, mask = self.samples[index]
        image, mask = weak_geometry(image, mask, self.crop_size, self.scale_range, self.ignore_index)
        return normalize(image), mask.to(torch.int64)


class UnlabeledTrainSet(_SeededView):
    """Weak and strong views of unlabeled images and their padding.

    Returns ``(weak float (3, c, c), strong float (3, c, c), ignore bool (c, c)[, strong2])`` where
    ``ignore`` is True on crop padding. Both views share the same geometry; the strong one adds
    colour jitter, grayscale and blur (CutMix is applied later, on the batch).
    """

    def __init__(
        self, images: Sequence[Tensor], crop_size: int, scale_range: tuple[float, float], seed: int, strong_views: int = 1
    ) -> None:
        self.images = images
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.seed = seed
        self.strong_views = strong_views
        self.strong_transform = strong_colour_transform()

    def __len__(self) -> int:
        """Number of underlying images."""
        return len(self.images)

    def augment(self, index: int) -> tuple[Tensor, ...]:
        """Weak view, strong view and padding of unlabeled image ``index`` (and a second strong
        view, drawn after the first, with ``strong_views = 2``)."""
        image = self.images[index]
        padding = torch.zeros(image.shape[-2:], dtype=torch.uint8)
        weak, padding = weak_geometry(image, padding, self.crop_size, self.scale_range, fill=1)
        strong = self.strong_transform(tv_tensors.Image(weak)).as_subclass(Tensor)
        sample = [normalize(weak), normalize(strong), padding.bool()]
        if self.strong_views == 2:
            sample.append(normalize(self.strong_transform(tv_tensors.Image(weak)).as_subclass(Tensor)))
        return tuple(sample)


# ----------------------------------------------------------------------------------------------
# Evaluation view
# ----------------------------------------------------------------------------------------------


class EvalSet(Dataset):
    """Evaluation samples ``(image float (3, H, W), mask int64 (H, W))``.

    Mode ``"whole"`` keeps each image at its own size; ``"center_crop"`` takes the central
    ``crop_size`` square, padding images smaller than it (image 0, mask ``ignore_index``).
    """

    MODES = ("whole", "center_crop")

    def __init__(
        self,
        samples: Sequence[tuple[Tensor, Tensor]],
        mode: str = "whole",
        crop_size: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown eval mode {mode!r}; expected one of {self.MODES}")
        if mode == "center_crop" and (crop_size is None or crop_size < 1):
            raise ValueError(f"eval mode 'center_crop' needs a positive crop_size, got {crop_size}")
        self.samples = samples
        self.mode = mode
        self.crop_size = crop_size
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Normalised image and mask of sample ``index``."""
        image, mask = self.samples[index]
        if self.mode == "center_crop":
            assert self.crop_size is not None
            height, width = image.shape[-2:]
            pad_h, pad_w = max(self.crop_size - height, 0), max(self.crop_size - width, 0)
            padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]
            transform = v2.Compose(
                [
                    v2.Pad(padding, fill={tv_tensors.Image: 0, tv_tensors.Mask: self.ignore_index}),
                    v2.CenterCrop(self.crop_size),
                ]
            )
            image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
            image, mask = image.as_subclass(Tensor), mask.as_subclass(Tensor)
        return normalize(image), mask.to(torch.int64)
