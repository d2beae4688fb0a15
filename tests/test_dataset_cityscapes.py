"""Tests of the ``cityscapes`` dataset plugin on tiny trees written in the real layout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sandbox_builtins.cityscapes import LABEL_ID_LOOKUP, PALETTE, make_cityscapes
from sandbox.data.segmentation_files import LabeledFiles
from sandbox.api import IGNORE_INDEX, SegmentationSource
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry

TRAIN_CITIES = {"aachen": 10, "bremen": 6}
VAL_CITIES = {"frankfurt": 4}
SIZE = (16, 8)  # width, height
LABEL_IDS = np.array([0, 1, 4, 6, 7, 8, 11, 17, 21, 23, 24, 26, 31, 33], dtype=np.uint8)
"""A mix of evaluated ids and unmapped ones (0 unlabeled, 1 ego vehicle, 4 static, 6 ground)."""


def name(city: str, number: int) -> str:
    """A Cityscapes sample name."""
    return f"{city}_{number:06d}_000019"


def label_ids(seed: int) -> np.ndarray:
    """A labelIds mask drawn from :data:`LABEL_IDS`."""
    return np.random.default_rng(seed).choice(LABEL_IDS, size=(SIZE[1], SIZE[0])).astype(np.uint8)


def make_tree(root: Path, train_ids: bool = False) -> Path:
    """A Cityscapes tree: 16 train images in two cities, 4 val; labelIds masks (or labelTrainIds)."""
    seed = 0
    for part, cities in (("train", TRAIN_CITIES), ("val", VAL_CITIES)):
        for city, count in cities.items():
            (root / "leftImg8bit" / part / city).mkdir(parents=True)
            (root / "gtFine" / part / city).mkdir(parents=True)
            for number in range(count):
                seed += 1
                pixels = np.random.default_rng(seed).integers(0, 256, size=(SIZE[1], SIZE[0], 3), dtype=np.uint8)
                image = root / "leftImg8bit" / part / city / f"{name(city, number)}_leftImg8bit.png"
                Image.fromarray(pixels).save(image)
                ids = label_ids(seed)
                gt = root / "gtFine" / part / city
                if train_ids:
                    trainid = np.array(LABEL_ID_LOOKUP, dtype=np.uint8)[ids]
                    Image.fromarray(trainid).save(gt / f"{name(city, number)}_gtFine_labelTrainIds.png")
                else:
                    Image.fromarray(ids).save(gt / f"{name(city, number)}_gtFine_labelIds.png")
    return root


@pytest.fixture
def cityscapes(tmp_path: Path) -> Path:
    """A tiny Cityscapes tree with labelIds masks."""
    return make_tree(tmp_path / "cityscapes")


def names(part: LabeledFiles) -> list[str]:
    """Sample names of a labeled part."""
    return [image.name.removesuffix("_leftImg8bit.png") for image, _ in part.samples]


def test_registry_builds_and_validates_options(cityscapes: Path) -> None:
    component = load_registry().get("dataset", "cityscapes")
    assert set(component.option_names()) >= {"root", "labeled", "split_file", "seed", "check_files"}
    source = component.build({"root": str(cityscapes), "labeled": 0.25})
    assert isinstance(source, SegmentationSource)
    assert (len(source.labeled), len(source.unlabeled), len(source.val)) == (4, 12, 4)
    with pytest.raises(SandboxError, match="unknown option 'fraction'"):
        component.build({"root": str(cityscapes), "fraction": 0.5})
    with pytest.raises(SandboxError, match=r"dataset 'cityscapes' .*asks for 17 labeled images .* holds only 16"):
        component.build({"root": str(cityscapes), "labeled": 17})


def test_label_ids_map_to_train_ids(cityscapes: Path) -> None:
    source = make_cityscapes(root=str(cityscapes))
    assert source.num_classes == 19 == len(source.class_names) == len(source.palette)
    assert source.class_names[0] == "road" and source.class_names[18] == "bicycle"
    assert PALETTE[0] == (128, 64, 128) and PALETTE[13] == (0, 0, 142)
    image, mask = source.val[0]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE[1], SIZE[0])
    assert mask.dtype == torch.int64 and mask.shape == (SIZE[1], SIZE[0])
    raw = label_ids(sum(TRAIN_CITIES.values()) + 1)  # the first val sample's seed
    expected = {0: 255, 1: 255, 4: 255, 6: 255, 7: 0, 8: 1, 11: 2, 17: 5, 21: 8, 23: 10, 24: 11, 26: 13, 31: 16, 33: 18}
    for label_id, train_id in expected.items():
        assert (mask[torch.from_numpy(raw == label_id)] == train_id).all(), label_id
    assert (mask == IGNORE_INDEX).any() and set(mask.unique().tolist()) <= set(range(19)) | {255}


def test_label_train_ids_are_read_as_they_are(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "cs", train_ids=True)
    source = make_cityscapes(root=str(root), labeled=4)
    _, mask = source.val[0]
    raw = label_ids(sum(TRAIN_CITIES.values()) + 1)
    assert torch.equal(mask, torch.from_numpy(np.array(LABEL_ID_LOOKUP)[raw].astype(np.int64)))
    assert all(mask_path.name.endswith("_gtFine_labelTrainIds.png") for _, mask_path in source.labeled.samples)


def test_generated_split_is_deterministic_and_disjoint(cityscapes: Path) -> None:
    first = make_cityscapes(root=str(cityscapes), labeled=0.25, seed=0)
    assert names(first.labeled) == names(make_cityscapes(root=str(cityscapes), labeled=0.25, seed=0).labeled)
    assert names(first.labeled) != names(make_cityscapes(root=str(cityscapes), labeled=0.25, seed=1).labeled)
    unlabeled = {path.name.removesuffix("_leftImg8bit.png") for path in first.unlabeled.paths}
    all_train = {name(city, n) for city, count in TRAIN_CITIES.items() for n in range(count)}
    assert not unlabeled & set(names(first.labeled)) and unlabeled | set(names(first.labeled)) == all_train
    assert len(make_cityscapes(root=str(cityscapes), labeled=1 / 16).labeled) == 1
    assert len(make_cityscapes(root=str(cityscapes), labeled=0.125).labeled) == 2
    assert len(make_cityscapes(root=str(cityscapes), labeled=5).labeled) == 5


def test_split_files(cityscapes: Path, tmp_path: Path) -> None:
    first, second = name("aachen", 2), name("bremen", 4)
    split = tmp_path / "labeled.txt"
    split.write_text(
        f"leftImg8bit/train/aachen/{first}_leftImg8bit.png gtFine/train/aachen/{first}_gtFine_labelIds.png\n{second}\n"
    )
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text(f"bremen/{name('bremen', 0)}\n")
    source = make_cityscapes(root=str(cityscapes), split_file=str(split), unlabeled_split_file=str(unlabeled))
    assert names(source.labeled) == [first, second]
    assert [path.parent.name for path in source.unlabeled.paths] == ["bremen"]
    rest = make_cityscapes(root=str(cityscapes), split_file=str(split))
    assert len(rest.unlabeled) == 14
    split.write_text(f"{name('aachen', 99)}\n")
    missing = cityscapes / "leftImg8bit/train/aachen" / f"{name('aachen', 99)}_leftImg8bit.png"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{split}:1: image {missing} does not exist")):
        make_cityscapes(root=str(cityscapes), split_file=str(split))


def unimatch_line(city: str, number: int, suffix: str = "labelTrainIds") -> str:
    """A UniMatch-format Cityscapes split line (UniMatch names ``_gtFine_labelTrainIds.png`` masks)."""
    sample = name(city, number)
    return f"leftImg8bit/train/{city}/{sample}_leftImg8bit.png gtFine/train/{city}/{sample}_gtFine_{suffix}.png"


def train_seed(city: str, number: int) -> int:
    """The seed :func:`make_tree` drew the train sample ``city``/``number`` with."""
    cities = list(TRAIN_CITIES)
    return sum(TRAIN_CITIES[c] for c in cities[: cities.index(city)]) + number + 1


def test_unimatch_lists_on_an_official_tree(cityscapes: Path, tmp_path: Path) -> None:
    split = tmp_path / "labeled.txt"
    split.write_text(f"{unimatch_line('aachen', 3)}\n{unimatch_line('bremen', 1)}\n", encoding="utf-8-sig")
    source = make_cityscapes(root=str(cityscapes), split_file=str(split))
    assert names(source.labeled) == [name("aachen", 3), name("bremen", 1)]
    assert [mask.name for _, mask in source.labeled.samples] == [
        f"{name('aachen', 3)}_gtFine_labelIds.png", f"{name('bremen', 1)}_gtFine_labelIds.png",
    ]  # fmt: skip
    expected = np.array(LABEL_ID_LOOKUP)[label_ids(train_seed("aachen", 3))]
    assert torch.equal(source.labeled[0][1], torch.from_numpy(expected.astype(np.int64))), "labelIds -> trainIds"
    gt = cityscapes / "gtFine/train/bremen"
    (gt / f"{name('bremen', 1)}_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError) as error:
        make_cityscapes(root=str(cityscapes), split_file=str(split))
    message = str(error.value)
    sample = name("bremen", 1)
    listed, fallback = gt / f"{sample}_gtFine_labelTrainIds.png", gt / f"{sample}_gtFine_labelIds.png"
    assert "\n" not in message and f"{split}:2: image " in message
    assert f"({listed} does not exist, nor the fallback {fallback})" in message


def test_the_decoder_follows_the_file_read(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "cs", train_ids=True)
    split = tmp_path / "labeled.txt"
    split.write_text(f"{unimatch_line('aachen', 1, 'labelIds')}\n{unimatch_line('aachen', 2)}\n")
    source = make_cityscapes(root=str(root), split_file=str(split))
    assert all(mask.name.endswith("_gtFine_labelTrainIds.png") for _, mask in source.labeled.samples)
    expected = np.array(LABEL_ID_LOOKUP)[label_ids(train_seed("aachen", 1))]
    assert torch.equal(source.labeled[0][1], torch.from_numpy(expected.astype(np.int64))), "read as they are"
    gt = root / "gtFine/train/aachen"  # both files: each line reads the one it names, each decoded its way
    for number in (1, 2):
        raw = label_ids(train_seed("aachen", number))
        Image.fromarray(raw).save(gt / f"{name('aachen', number)}_gtFine_labelIds.png")
    both = make_cityscapes(root=str(root), split_file=str(split))
    assert [mask.name.split("_gtFine_")[1] for _, mask in both.labeled.samples] == ["labelIds.png", "labelTrainIds.png"]
    for index, number in enumerate((1, 2)):
        expected = np.array(LABEL_ID_LOOKUP)[label_ids(train_seed("aachen", number))]
        assert torch.equal(both.labeled[index][1], torch.from_numpy(expected.astype(np.int64)))


def test_missing_folder_and_image_without_mask(cityscapes: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"folder .*nowhere does not exist \(expected the Cityscapes folder"):
        make_cityscapes(root=str(tmp_path / "nowhere"))
    orphan = name("bremen", 1)
    (cityscapes / "gtFine/train/bremen" / f"{orphan}_gtFine_labelIds.png").unlink()
    pattern = rf"image .*{orphan}_leftImg8bit\.png has no mask .*{orphan}_gtFine_labelIds\.png"
    with pytest.raises(FileNotFoundError, match=pattern):
        make_cityscapes(root=str(cityscapes))
    for path in (cityscapes / "gtFine/val/frankfurt").iterdir():
        path.unlink()
    (cityscapes / "gtFine/val/frankfurt").rmdir()
    (cityscapes / "gtFine/val").rmdir()
    with pytest.raises(FileNotFoundError, match=r"folder .*gtFine/val does not exist \(expected the val masks"):
        make_cityscapes(root=str(cityscapes))


def test_unknown_label_ids_size_mismatch_and_corrupt_files(cityscapes: Path) -> None:
    bad = cityscapes / "gtFine/val/frankfurt" / f"{name('frankfurt', 1)}_gtFine_labelIds.png"
    ids = label_ids(0)
    ids[0, :3] = (34, 40, 255)
    Image.fromarray(ids).save(bad)
    pattern = rf"mask {re.escape(str(bad))} has unknown label values 34, 40; expected label values 0\.\.33 or 255"
    with pytest.raises(ValueError, match=pattern):
        make_cityscapes(root=str(cityscapes))
    source = make_cityscapes(root=str(cityscapes), check_files=False)
    with pytest.raises(ValueError, match="unknown label values 34, 40"):
        source.val[1]
    Image.fromarray(label_ids(0)[:, :10]).save(bad)
    with pytest.raises(ValueError, match=r"image .*_leftImg8bit\.png is 16x8 but its mask .*_labelIds\.png is 10x8"):
        make_cityscapes(root=str(cityscapes))
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=rf"cannot decode mask {re.escape(str(bad))}"):
        make_cityscapes(root=str(cityscapes))
