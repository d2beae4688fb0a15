"""Tests of the generated ``shapes`` dataset plugin."""

from __future__ import annotations


import pluggy
import pytest
import torch

from sandbox_builtins import shapes_dataset
from sandbox_builtins.shapes_dataset import CLASS_NAMES, ShapesPart, make_shapes_dataset
from sandbox import hookspecs
from sandbox.api import IGNORE_INDEX, PROJECT_NAME, SegmentationSource

SIZE = 48


def small(seed: int = 0, image_size: int = SIZE) -> SegmentationSource:
    """A small shapes source for fast tests."""
    return make_shapes_dataset(num_labeled=8, num_unlabeled=16, num_val=8, image_size=image_size, seed=seed)


def test_registers_through_the_hook() -> None:
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(shapes_dataset)
    calls: list[tuple[str, object, object]] = []

    def register(name: str, factory: object, description: str | None = None) -> None:
        calls.append((name, factory, description))

    manager.hook.sandbox_register_datasets(register=register)
    assert calls == [("shapes", make_shapes_dataset, None)]
    assert make_shapes_dataset.__doc__ and make_shapes_dataset.__doc__.strip().splitlines()[0]


def test_source_fields_and_lengths() -> None:
    source = make_shapes_dataset(num_labeled=3, num_unlabeled=5, num_val=2, image_size=SIZE)
    assert isinstance(source, SegmentationSource)
    assert source.num_classes == 5 == len(source.class_names) == len(source.palette)
    assert source.class_names[0] == "background" and len(set(source.class_names)) == 5
    assert all(len(colour) == 3 and all(0 <= c <= 255 for c in colour) for colour in source.palette)
    assert source.ignore_index == IGNORE_INDEX
    assert (len(source.labeled), len(source.unlabeled), len(source.val)) == (3, 5, 2)


def test_item_types_shapes_and_ranges() -> None:
    source = small()
    for part in (source.labeled, source.val):
        image, mask = part[0]
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
        assert mask.dtype == torch.int64 and mask.shape == (SIZE, SIZE)
    image = source.unlabeled[0]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
    assert int(image.max()) - int(image.min()) > 50, "images should not be flat"


def test_same_index_same_tensors_independent_of_order() -> None:
    first, second = small(), small()
    forward = [first.labeled[i] for i in (2, 5, 7)]
    backward = [second.labeled[i] for i in (7, 5, 2)][::-1]
    for (image_a, mask_a), (image_b, mask_b) in zip(forward, backward):
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    assert torch.equal(first.unlabeled[3], first.unlabeled[3])
    assert torch.equal(first.unlabeled[-1], first.unlabeled[len(first.unlabeled) - 1])


def test_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    small().labeled[0]
    assert torch.equal(state, torch.get_rng_state())


def test_different_seeds_differ() -> None:
    a, b = small(seed=0), small(seed=1)
    assert not torch.equal(a.labeled[0][0], b.labeled[0][0])
    assert not torch.equal(a.unlabeled[0], b.unlabeled[0])


def test_parts_do_not_share_images() -> None:
    source = small()
    images = [image for image, _ in source.labeled] + list(source.unlabeled) + [image for image, _ in source.val]
    assert len({image.numpy().tobytes() for image in images}) == len(images)


def test_masks_hold_valid_classes_and_every_class_appears() -> None:
    source = small()
    seen: set[int] = set()
    for _, mask in list(source.labeled) + list(source.val):
        values = set(mask.unique().tolist())
        assert values <= set(range(len(CLASS_NAMES))) | {IGNORE_INDEX}
        assert 0 < (mask != 0).float().mean() < 0.95, "each image holds shapes and background"
        seen |= values
    assert seen >= set(range(len(CLASS_NAMES)))


def test_shape_appearance_varies_and_is_textured() -> None:
    """A class is not one constant colour: its mean colour varies between images and it is textured."""
    part = ShapesPart("val", 40, 64, seed=3)
    means, spreads = {c: [] for c in range(1, 5)}, {c: [] for c in range(1, 5)}
    for image, mask in part:
        for label in range(1, 5):
            pixels = image[:, mask == label].float()
            if pixels.shape[1] >= 80:
                means[label].append(pixels.mean(dim=1))
                spreads[label].append(pixels.std(dim=1).mean())
    for label in range(1, 5):
        assert len(means[label]) >= 3, f"class {label} too rare"
        assert torch.stack(means[label]).std(dim=0).max() > 10, f"class {label} colour is constant"
        assert torch.stack(spreads[label]).median() > 15, f"class {label} is not textured"


def test_index_errors_and_iteration() -> None:
    source = small()
    with pytest.raises(IndexError):
        source.val[len(source.val)]
    with pytest.raises(IndexError):
        source.val[-len(source.val) - 1]
    assert len(list(source.val)) == len(source.val)
    assert len(source.unlabeled[2:5]) == 3


@pytest.mark.parametrize("options", [{"num_labeled": -1}, {"image_size": 8}, {"seed": -1}])
def test_invalid_options(options: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        make_shapes_dataset(**options)
