"""Tests of the ``pascal_voc`` dataset plugin on tiny VOC trees written in the real layout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sandbox_builtins.pascal_voc import BOUNDARY_COLOUR, CLASS_NAMES, PALETTE, make_pascal_voc
from sandbox.data.segmentation_files import LabeledFiles, color_map
from sandbox.api import IGNORE_INDEX, SegmentationSource
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry

TRAIN = [f"2007_{i:06d}" for i in range(10)]
VAL = [f"2008_{i:06d}" for i in range(3)]
SBD = [f"2009_{i:06d}" for i in range(8)]
SIZE = (12, 9)  # width, height


def voc_mask(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Class ids 0..20 with a 255 boundary frame."""
    ids = np.random.default_rng(seed).integers(0, len(CLASS_NAMES), size=(size[1], size[0]), dtype=np.uint8)
    ids[0, :] = IGNORE_INDEX
    return ids


def write_image(path: Path, seed: int, size: tuple[int, int] = SIZE) -> None:
    """A random RGB image (JPEG or PNG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_palette_mask(path: Path, ids: np.ndarray) -> None:
    """A VOC-style palette PNG: the palette index is the class id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids).convert("P")
    image.putpalette([value for colour in color_map() for value in colour])
    image.save(path)


def make_tree(root: Path, aug: bool = False, train_aug_txt: bool = False) -> Path:
    """A VOC2012 tree: 10 train, 3 val ids; with ``aug`` a SegmentationClassAug of train + 8 SBD + val."""
    for number, sample_id in enumerate(TRAIN + VAL):
        write_image(root / "JPEGImages" / f"{sample_id}.jpg", number)
        write_palette_mask(root / "SegmentationClass" / f"{sample_id}.png", voc_mask(number))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (sets / "val.txt").write_text("\n".join(VAL) + "\n")
    if aug:
        for number, sample_id in enumerate(SBD, start=100):
            write_image(root / "JPEGImages" / f"{sample_id}.jpg", number)
        (root / "SegmentationClassAug").mkdir()
        for number, sample_id in enumerate(TRAIN + SBD + VAL):  # grayscale PNGs of class ids
            Image.fromarray(voc_mask(number + 1000)).save(root / "SegmentationClassAug" / f"{sample_id}.png")
    if train_aug_txt:
        (sets / "train_aug.txt").write_text("\n".join(TRAIN + SBD[:4]) + "\n")
    return root


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """A classic VOC tree."""
    return make_tree(tmp_path / "VOC2012")


@pytest.fixture
def voc_aug(tmp_path: Path) -> Path:
    """A VOC tree with the SBD-augmented masks."""
    return make_tree(tmp_path / "VOC2012", aug=True)


def stems(part: LabeledFiles) -> list[str]:
    """Ids of a labeled part."""
    return [image.stem for image, _ in part.samples]


def test_registry_builds_and_validates_options(voc: Path) -> None:
    component = load_registry().get("dataset", "pascal_voc")
    assert component.option_names() == [
        "root", "labeled", "aug", "split_file", "unlabeled_split_file", "val_split_file", "seed", "check_files",
    ]  # fmt: skip
    source = component.build({"root": str(voc), "labeled": 4})
    assert isinstance(source, SegmentationSource)
    assert (len(source.labeled), len(source.unlabeled), len(source.val)) == (4, 6, 3)
    with pytest.raises(SandboxError, match="unknown option 'labelled'"):
        component.build({"root": str(voc), "labelled": 4})
    with pytest.raises(SandboxError, match="labeled"):
        component.build({"root": str(voc), "labeled": "many"})
    with pytest.raises(SandboxError, match=r"dataset 'pascal_voc' .*: folder .*nowhere does not exist") as error:
        component.build({"root": str(voc.parent / "nowhere")})
    assert "\n" not in str(error.value)


def test_classes_palette_and_mask_values(voc: Path) -> None:
    source = make_pascal_voc(root=str(voc), labeled=4)
    assert source.num_classes == 21 == len(source.class_names) == len(source.palette)
    assert source.class_names[0] == "background" and source.class_names[20] == "tvmonitor"
    assert source.palette[1] == (128, 0, 0) and source.palette[20] == (0, 64, 128)
    assert BOUNDARY_COLOUR == (224, 224, 192)
    image, mask = source.val[0]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE[1], SIZE[0])
    assert mask.dtype == torch.int64 and mask.shape == (SIZE[1], SIZE[0])
    expected = voc_mask(len(TRAIN))  # the first val id
    assert torch.equal(mask, torch.from_numpy(expected.astype(np.int64)))
    assert (mask[0] == IGNORE_INDEX).all(), "the 255 boundary stays ignore"
    assert source.unlabeled[0].shape == (3, SIZE[1], SIZE[0])


def test_rgb_masks_decode_through_the_palette(voc: Path) -> None:
    ids = voc_mask(0)
    rgb = np.array(color_map(), dtype=np.uint8)[ids]
    Image.fromarray(rgb).save(voc / "SegmentationClass" / f"{TRAIN[0]}.png")
    source = make_pascal_voc(root=str(voc), split_file=str(voc / "ImageSets/Segmentation/train.txt"))
    assert torch.equal(source.labeled[0][1], torch.from_numpy(ids.astype(np.int64)))


def test_classic_split_is_deterministic_and_disjoint(voc: Path) -> None:
    first = make_pascal_voc(root=str(voc), labeled=4, seed=0)
    again = make_pascal_voc(root=str(voc), labeled=4, seed=0)
    other = make_pascal_voc(root=str(voc), labeled=4, seed=1)
    assert stems(first.labeled) == stems(again.labeled)
    assert stems(first.labeled) != stems(other.labeled)
    unlabeled = {path.stem for path in first.unlabeled.paths}
    assert not unlabeled & set(stems(first.labeled))
    assert unlabeled | set(stems(first.labeled)) == set(TRAIN)
    half = make_pascal_voc(root=str(voc), labeled=0.5)
    assert len(half.labeled) == 5 and len(half.unlabeled) == 5
    assert len(make_pascal_voc(root=str(voc), labeled=1 / 16).labeled) == 1  # rounded up, at least one
    everything = make_pascal_voc(root=str(voc), labeled=len(TRAIN))
    assert len(everything.unlabeled) == 0 and sorted(stems(everything.labeled)) == TRAIN


def test_aug_pool_classic_and_blended(voc_aug: Path) -> None:
    classic = make_pascal_voc(root=str(voc_aug), labeled=4, aug=True)
    assert set(stems(classic.labeled)) <= set(TRAIN)
    unlabeled = {path.stem for path in classic.unlabeled.paths}
    assert unlabeled == set(TRAIN + SBD) - set(stems(classic.labeled)), "pool = aug masks minus val minus labeled"
    blended = make_pascal_voc(root=str(voc_aug), labeled=0.25, aug=True, seed=3)
    assert len(blended.labeled) == 5  # ceil(18 / 4)
    assert not {path.stem for path in blended.unlabeled.paths} & set(stems(blended.labeled))
    for image, mask in blended.labeled.samples:  # classic mask when there is one, else the SBD one
        assert mask.parent.name == ("SegmentationClass" if image.stem in TRAIN else "SegmentationClassAug")
    (voc_aug / "sbd.txt").write_text(SBD[0])
    sbd_only = make_pascal_voc(root=str(voc_aug), split_file="sbd.txt", aug=True)
    assert torch.equal(sbd_only.labeled[0][1], torch.from_numpy(voc_mask(len(TRAIN) + 1000).astype(np.int64)))
    with pytest.raises(ValueError, match=r"asks for 11 labeled images but .*train\.txt.* holds only 10"):
        make_pascal_voc(root=str(voc_aug), labeled=11, aug=True)


def test_train_aug_txt_defines_the_pool(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "VOC2012", aug=True, train_aug_txt=True)
    source = make_pascal_voc(root=str(root), labeled=2, aug=True)
    everything = {path.stem for path in source.unlabeled.paths} | set(stems(source.labeled))
    assert everything == set(TRAIN + SBD[:4])


def test_split_files_unimatch_format_and_ids(voc_aug: Path, tmp_path: Path) -> None:
    labeled_txt = tmp_path / "labeled.txt"
    labeled_txt.write_text(f"JPEGImages/{TRAIN[3]}.jpg SegmentationClass/{TRAIN[3]}.png\n\n{TRAIN[5]}\n")
    unlabeled_txt = tmp_path / "unlabeled.txt"
    unlabeled_txt.write_text(f"JPEGImages/{SBD[0]}.jpg SegmentationClass/{SBD[0]}.png\n{SBD[1]}\n")
    source = make_pascal_voc(root=str(voc_aug), split_file=str(labeled_txt), unlabeled_split_file=str(unlabeled_txt))
    assert stems(source.labeled) == [TRAIN[3], TRAIN[5]]
    assert [path.stem for path in source.unlabeled.paths] == SBD[:2], "unlabeled lines need no mask"
    (voc_aug / "splits").mkdir()
    (voc_aug / "splits" / "l.txt").write_text(TRAIN[1])
    relative = make_pascal_voc(root=str(voc_aug), split_file="splits/l.txt", aug=True)
    assert stems(relative.labeled) == [TRAIN[1]], "a split file is also looked up relative to the root"
    assert len(relative.unlabeled) == len(TRAIN) + len(SBD) - 1


def one_line_match(error: pytest.ExceptionInfo[BaseException], *parts: str) -> None:
    """The error is one line containing every part."""
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_missing_folders(voc: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"folder .*missing does not exist \(expected the VOC2012 folder"):
        make_pascal_voc(root=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"SegmentationClassAug does not exist"):
        make_pascal_voc(root=str(voc), aug=True, labeled=0.5)
    (voc / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split file .*val\.txt does not exist"):
        make_pascal_voc(root=str(voc))


def test_image_without_mask_names_the_image(voc: Path) -> None:
    (voc / "SegmentationClass" / f"{TRAIN[2]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"train\.txt:3: image .*{TRAIN[2]}\.jpg has no mask") as error:
        make_pascal_voc(root=str(voc), labeled=2)
    one_line_match(error, f"SegmentationClass/{TRAIN[2]}.png does not exist")


def test_unknown_label_values(voc: Path) -> None:
    ids = voc_mask(1)
    ids[2, 2], ids[3, 3] = 21, 40
    write_palette_mask(voc / "SegmentationClass" / f"{VAL[1]}.png", ids)
    pattern = rf"mask .*{VAL[1]}\.png has unknown label values 21, 40; expected class ids 0\.\.20 or 255"
    with pytest.raises(ValueError, match=pattern):
        make_pascal_voc(root=str(voc), labeled=2)
    source = make_pascal_voc(root=str(voc), labeled=2, check_files=False)  # deferred to reading
    with pytest.raises(ValueError, match=pattern):
        source.val[1]


def test_size_mismatch_and_corrupt_image(voc: Path) -> None:
    write_palette_mask(voc / "SegmentationClass" / f"{VAL[0]}.png", voc_mask(0, size=(8, 8)))
    with pytest.raises(ValueError, match=rf"image .*{VAL[0]}\.jpg is 12x9 but its mask .*{VAL[0]}\.png is 8x8"):
        make_pascal_voc(root=str(voc), labeled=2)
    write_palette_mask(voc / "SegmentationClass" / f"{VAL[0]}.png", voc_mask(0))
    (voc / "JPEGImages" / f"{TRAIN[7]}.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=rf"cannot decode image .*{TRAIN[7]}\.jpg") as error:
        make_pascal_voc(root=str(voc), labeled=2)
    one_line_match(error)


def test_split_file_errors(voc: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.txt"
    split.write_text(f"JPEGImages/{TRAIN[0]}.jpg SegmentationClass/{TRAIN[0]}.png\nJPEGImages/no.jpg x/no.png\n")
    expected = f"{split}:2: image {voc / 'JPEGImages/no.jpg'} does not exist"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        make_pascal_voc(root=str(voc), split_file=str(split))
    split.write_text("a b c\n")
    with pytest.raises(ValueError, match=r"split\.txt:1: expected 'image_path mask_path' or one id"):
        make_pascal_voc(root=str(voc), split_file=str(split))
    with pytest.raises(FileNotFoundError, match=r"split file .*absent\.txt does not exist"):
        make_pascal_voc(root=str(voc), split_file=str(tmp_path / "absent.txt"))


def unimatch_line(sample_id: str, masks: str = "SegmentationClass", prefix: str = "") -> str:
    """A UniMatch-format split line (``prefix`` "/" gives the DeepLab ``train_aug.txt`` form)."""
    return f"{prefix}JPEGImages/{sample_id}.jpg {prefix}{masks}/{sample_id}.png"


UTF16_WITH_BOM = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}


def test_split_file_with_utf8_bom(voc_aug: Path, tmp_path: Path) -> None:
    split = tmp_path / "labeled.txt"
    split.write_text(f"{TRAIN[3]}\n{TRAIN[5]}\n", encoding="utf-8-sig")
    assert split.read_bytes().startswith(b"\xef\xbb\xbf")
    assert stems(make_pascal_voc(root=str(voc_aug), split_file=str(split)).labeled) == [TRAIN[3], TRAIN[5]]
    split.write_text(unimatch_line(SBD[0]) + "\r\n", encoding="utf-8-sig")  # Notepad: BOM and CRLF
    source = make_pascal_voc(root=str(voc_aug), split_file=str(split))
    assert [image.name for image, _ in source.labeled.samples] == [f"{SBD[0]}.jpg"]


@pytest.mark.parametrize("encoding", sorted(UTF16_WITH_BOM))
def test_split_file_in_utf16_with_bom(voc: Path, tmp_path: Path, encoding: str) -> None:
    split = tmp_path / "labeled.txt"
    split.write_bytes(UTF16_WITH_BOM[encoding] + f"{unimatch_line(TRAIN[2])}\r\n{TRAIN[4]}\r\n".encode(encoding))
    assert stems(make_pascal_voc(root=str(voc), split_file=str(split)).labeled) == [TRAIN[2], TRAIN[4]]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text (byte 0x89 at offset 0)"),
        (f"{TRAIN[0]}\n".encode("utf-16-le"), "holds NUL characters, so it is not a text file"),
        ("2007_00000\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 10)"),
        (b"\xff\xfe" + "2007".encode("utf-16-le") + b"\x00", "is not UTF-16-LE text"),
    ],
    ids=["binary", "utf16-without-bom", "latin-1", "truncated-utf16"],
)
def test_split_file_that_is_not_text(voc: Path, tmp_path: Path, content: bytes, expected: str) -> None:
    split = tmp_path / "labeled.txt"
    split.write_bytes(content)
    with pytest.raises(ValueError) as error:
        make_pascal_voc(root=str(voc), split_file=str(split))
    one_line_match(error, f"split file {split} ", expected, "expected a UTF-8 text file")


def test_two_path_lines_fall_back_like_ids(voc_aug: Path, tmp_path: Path) -> None:
    split = tmp_path / "labeled.txt"  # UniMatch names SegmentationClass/ for the SBD-only images too
    lines = [unimatch_line(TRAIN[1]), unimatch_line(SBD[2]), SBD[3], unimatch_line(TRAIN[4], "SegmentationClassAug")]
    split.write_text("\n".join(lines) + "\n")
    source = make_pascal_voc(root=str(voc_aug), split_file=str(split))
    masks = [(mask.parent.name, mask.stem) for _, mask in source.labeled.samples]
    assert masks == [
        ("SegmentationClass", TRAIN[1]),  # the listed mask exists: used as listed
        ("SegmentationClassAug", SBD[2]),  # missing: the same fallback as the id-only line below
        ("SegmentationClassAug", SBD[3]),
        ("SegmentationClassAug", TRAIN[4]),  # listed and present, although a classic mask exists
    ]
    expected = voc_mask(len(TRAIN) + 2 + 1000)  # the SBD-augmented mask of SBD[2]
    assert torch.equal(source.labeled[1][1], torch.from_numpy(expected.astype(np.int64)))
    (voc_aug / "SegmentationClassAug" / f"{SBD[2]}.png").unlink()
    with pytest.raises(FileNotFoundError) as error:
        make_pascal_voc(root=str(voc_aug), split_file=str(split))
    listed, fallback = voc_aug / f"SegmentationClass/{SBD[2]}.png", voc_aug / f"SegmentationClassAug/{SBD[2]}.png"
    one_line_match(error, f"{split}:2: image ", f"({listed} does not exist, nor the fallback {fallback})")


def test_train_aug_lists_unimatch_and_deeplab_forms(voc_aug: Path) -> None:
    sets = voc_aug / "ImageSets" / "Segmentation"
    deeplab = [unimatch_line(sample_id, "SegmentationClassAug", prefix="/") for sample_id in TRAIN + SBD]
    unimatch = [unimatch_line(sample_id) for sample_id in TRAIN + SBD]
    for lines in (deeplab, unimatch):
        (sets / "train_aug.txt").write_text("\n".join(lines) + "\n")
        blended = make_pascal_voc(root=str(voc_aug), labeled=0.5, aug=True, seed=1)
        assert len(blended.labeled) == 9 and len(blended.unlabeled) == 9
        assert {path.stem for path in blended.unlabeled.paths} | set(stems(blended.labeled)) == set(TRAIN + SBD)
        explicit = make_pascal_voc(root=str(voc_aug), split_file=str(sets / "train_aug.txt"), labeled=1)
        assert stems(explicit.labeled) == TRAIN + SBD
        assert all(image.is_relative_to(voc_aug) for image, _ in explicit.labeled.samples)


def make_unimatch_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A root with JPEGImages/ and SegmentationClass/ (augmented masks) only, and UniMatch's splits/pascal/."""
    root = tmp_path / "VOC2012"
    (root / "SegmentationClass").mkdir(parents=True)
    for number, sample_id in enumerate(TRAIN + SBD + VAL):
        write_image(root / "JPEGImages" / f"{sample_id}.jpg", number)
        Image.fromarray(voc_mask(number + 1000)).save(root / "SegmentationClass" / f"{sample_id}.png")
    splits = tmp_path / "UniMatch" / "splits" / "pascal"
    (splits / "1_4").mkdir(parents=True)
    (splits / "val.txt").write_text("\n".join(unimatch_line(sample_id) for sample_id in VAL) + "\n")
    (splits / "1_4" / "labeled.txt").write_text("\n".join(unimatch_line(s) for s in TRAIN[:4] + SBD[:1]) + "\n")
    (splits / "1_4" / "unlabeled.txt").write_text("\n".join(unimatch_line(s) for s in TRAIN[4:] + SBD[1:]) + "\n")
    return root, splits


def test_unimatch_layout_without_imagesets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, splits = make_unimatch_tree(tmp_path)
    monkeypatch.chdir(splits.parent.parent)  # split files as given in UniMatch's configs, from its checkout
    options = {"split_file": "splits/pascal/1_4/labeled.txt", "unlabeled_split_file": "splits/pascal/1_4/unlabeled.txt"}
    source = make_pascal_voc(root=str(root), val_split_file="splits/pascal/val.txt", **options)
    assert (len(source.labeled), len(source.unlabeled), len(source.val)) == (5, 13, 3)
    assert stems(source.val) == VAL
    expected = voc_mask(len(TRAIN) + len(SBD) + 1000)  # the first val image's mask
    assert torch.equal(source.val[0][1], torch.from_numpy(expected.astype(np.int64)))
    with pytest.raises(FileNotFoundError) as error:
        make_pascal_voc(root=str(root), **options)
    one_line_match(error, f"split file {root / 'ImageSets/Segmentation/val.txt'} does not exist", "val_split_file")
    with pytest.raises(FileNotFoundError) as error:
        make_pascal_voc(root=str(root), split_file=options["split_file"], val_split_file="splits/pascal/val.txt")
    one_line_match(error, "ImageSets/Segmentation/train.txt does not exist", "unlabeled_split_file")
    with pytest.raises(FileNotFoundError) as error:
        make_pascal_voc(root=str(root), val_split_file="splits/pascal/val.txt")
    one_line_match(error, "ImageSets/Segmentation/train.txt does not exist", "split_file")


def test_val_split_file_on_a_standard_tree(voc_aug: Path, tmp_path: Path) -> None:
    (voc_aug / "val_subset.txt").write_text(f"{VAL[2]}\n{unimatch_line(VAL[0])}\n")
    source = make_pascal_voc(root=str(voc_aug), labeled=2, val_split_file="val_subset.txt")  # under the root
    assert stems(source.val) == [VAL[2], VAL[0]]
    assert all(mask.parent.name == "SegmentationClass" for _, mask in source.val.samples)
    assert len(make_pascal_voc(root=str(voc_aug), labeled=2).val) == len(VAL), "default: ImageSets val.txt"
    odd = tmp_path / "val.txt"  # val masks never fall back to the augmented ones, as for ids
    odd.write_text(unimatch_line(SBD[0]) + "\n")
    with pytest.raises(FileNotFoundError) as error:
        make_pascal_voc(root=str(voc_aug), labeled=2, val_split_file=str(odd))
    one_line_match(error, f"{odd}:1: image ", f"({voc_aug / 'SegmentationClass' / SBD[0]}.png does not exist)")


def test_label_count_errors(voc: Path) -> None:
    with pytest.raises(ValueError, match=r"labeled = 11 asks for 11 labeled images but .*train\.txt holds only 10"):
        make_pascal_voc(root=str(voc), labeled=11)
    with pytest.raises(ValueError, match=r"labeled = 1\.5: a fraction must be in \(0, 1\]"):
        make_pascal_voc(root=str(voc), labeled=1.5)
    with pytest.raises(ValueError, match="need at least one labeled image"):
        make_pascal_voc(root=str(voc), labeled=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        make_pascal_voc(root=str(voc), seed=-1)


def test_palette_constant_matches_the_voc_colour_map() -> None:
    assert PALETTE == color_map(21)
    assert PALETTE[15] == (192, 128, 128)  # person
