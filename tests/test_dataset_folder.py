"""Tests of the ``folder`` dataset plugin on tiny images/ + masks/ trees."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sandbox_builtins.folder_dataset import make_folder_dataset
from sandbox.data.segmentation_files import FULL_CHECK_LIMIT, LabeledFiles, color_map
from sandbox.api import IGNORE_INDEX, SegmentationSource
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry

CLASSES = ["background", "cat", "dog"]
PALETTE = [[0, 0, 0], [200, 0, 0], [0, 0, 200]]
SIZE = (10, 8)  # width, height
STEMS = [f"img{i:02d}" for i in range(20)]


def class_ids(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Random class ids 0..2 with one ignore (255) row."""
    ids = np.random.default_rng(seed).integers(0, len(CLASSES), size=(size[1], size[0]), dtype=np.uint8)
    ids[-1, :] = IGNORE_INDEX
    return ids


def write_image(path: Path, seed: int, size: tuple[int, int] = SIZE) -> None:
    """A random RGB image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_tree(root: Path, count: int = len(STEMS), unlabeled: int = 0) -> Path:
    """``count`` images (alternately .jpg and .png) with grayscale class-id masks, ``unlabeled`` extra images."""
    (root / "masks").mkdir(parents=True)
    for number, stem in enumerate(STEMS[:count]):
        write_image(root / "images" / f"{stem}.{'jpg' if number % 2 else 'png'}", number)
        Image.fromarray(class_ids(number)).save(root / "masks" / f"{stem}.png")
    for number in range(unlabeled):
        write_image(root / "unlabeled" / f"extra{number}.jpg", 100 + number)
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """20 labeled-capable images, 3 extra unlabeled ones."""
    return make_tree(tmp_path / "data", unlabeled=3)


def stems(part: LabeledFiles) -> list[str]:
    """Stems of a labeled part."""
    return [image.stem for image, _ in part.samples]


def test_registry_requires_and_validates_options(folder: Path) -> None:
    component = load_registry().get("dataset", "folder")
    assert component.option_names()[:2] == ["root", "class_names"]
    with pytest.raises(SandboxError, match="dataset 'folder' needs option 'class_names'"):
        component.build({"root": str(folder)})
    with pytest.raises(SandboxError, match="class_names"):
        component.build({"root": str(folder), "class_names": "cat"})
    source = component.build({"root": str(folder), "class_names": CLASSES, "palette": PALETTE, "labeled": 4})
    assert isinstance(source, SegmentationSource)
    assert (len(source.labeled), len(source.unlabeled), len(source.val)) == (4, 14 + 3, 2)
    assert source.palette == [tuple(colour) for colour in PALETTE]


def test_defaults_val_labeled_unlabeled(folder: Path) -> None:
    source = make_folder_dataset(root=str(folder), class_names=CLASSES)
    assert [image.stem for image, _ in source.val.samples] == ["img00", "img19"], "10% spread evenly"
    assert len(source.labeled) == 18
    assert [path.name for path in source.unlabeled.paths] == ["extra0.jpg", "extra1.jpg", "extra2.jpg"]
    assert source.palette == color_map(3), "without a palette the VOC colour map is used for display"
    image, mask = source.labeled[0]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE[1], SIZE[0])
    assert torch.equal(mask, torch.from_numpy(class_ids(STEMS.index(stems(source.labeled)[0])).astype(np.int64)))
    small = make_folder_dataset(root=str(make_tree(folder.parent / "small", count=3)), class_names=CLASSES)
    assert len(small.val) == 1 and len(small.labeled) == 2, "at least one val image"


def test_parts_pickle_for_dataloader_workers(folder: Path) -> None:
    source = make_folder_dataset(root=str(folder), class_names=CLASSES, labeled=4)
    restored = pickle.loads(pickle.dumps(source))
    for original, copy in zip(source.labeled[:2] + source.val[:1], restored.labeled[:2] + restored.val[:1]):
        assert all(torch.equal(a, b) for a, b in zip(original, copy))
    assert torch.equal(source.unlabeled[-1], restored.unlabeled[-1])


def test_generated_labeled_split_is_deterministic(folder: Path) -> None:
    first = make_folder_dataset(root=str(folder), class_names=CLASSES, labeled=0.25, seed=0)
    again = make_folder_dataset(root=str(folder), class_names=CLASSES, labeled=0.25, seed=0)
    assert stems(first.labeled) == stems(again.labeled)
    other = make_folder_dataset(root=str(folder), class_names=CLASSES, labeled=0.25, seed=1)
    assert stems(first.labeled) != stems(other.labeled)
    assert stems(first.val) == stems(other.val), "val does not depend on the seed"
    assert len(first.labeled) == 5  # ceil(0.25 * 18)
    unlabeled = {path.stem for path in first.unlabeled.paths}
    assert not unlabeled & set(stems(first.labeled)) and not unlabeled & set(stems(first.val))
    assert len(unlabeled) == 18 - 5 + 3
    with pytest.raises(ValueError, match=r"labeled = 19 asks for 19 labeled images but .*data/images .* holds only 18"):
        make_folder_dataset(root=str(folder), class_names=CLASSES, labeled=19)


def test_rgb_masks_and_custom_ignore_index(folder: Path) -> None:
    ids = class_ids(0)
    colours = np.array(PALETTE + [[0, 0, 0]] * 253, dtype=np.uint8)
    ids[-1, :] = 1
    Image.fromarray(colours[ids]).save(folder / "masks" / "img00.png")
    source = make_folder_dataset(root=str(folder), class_names=CLASSES, palette=PALETTE)
    assert torch.equal(source.val[0][1], torch.from_numpy(ids.astype(np.int64)))
    with pytest.raises(ValueError, match=r"mask .*img00\.png is an RGB image but the dataset has no palette"):
        make_folder_dataset(root=str(folder), class_names=CLASSES)
    rgb = colours[ids]
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(folder / "masks" / "img00.png")
    with pytest.raises(ValueError, match=r"mask .*img00\.png has colours not in the palette: \(1, 2, 3\)"):
        make_folder_dataset(root=str(folder), class_names=CLASSES, palette=PALETTE)
    ids[0, 0] = 99
    Image.fromarray(ids).save(folder / "masks" / "img00.png")
    custom = make_folder_dataset(root=str(folder), class_names=CLASSES, ignore_index=99, check_files=False)
    mask = custom.val[0][1]
    assert mask[0, 0] == IGNORE_INDEX == custom.ignore_index, "the ignore value becomes 255"
    with pytest.raises(ValueError, match=r"img19\.png has unknown label values 255; expected class ids 0\.\.2 or 99"):
        custom.val[1]  # 255 is no longer the ignore value
    with pytest.raises(ValueError, match="ignore_index = 2 is a class id"):
        make_folder_dataset(root=str(folder), class_names=CLASSES, ignore_index=2)


def test_split_files(folder: Path) -> None:
    (folder / "splits").mkdir()
    (folder / "splits" / "labeled.txt").write_text("img03\nimg04\n")
    (folder / "splits" / "val.txt").write_text("img05\n")
    source = make_folder_dataset(root=str(folder), class_names=CLASSES)
    assert stems(source.labeled) == ["img03", "img04"] and stems(source.val) == ["img05"]
    assert len(source.unlabeled) == 17 + 3
    (folder / "splits" / "unlabeled.txt").write_text("img06\nextra1\nloose\n")
    write_image(folder / "images" / "loose.jpg", 7)  # no mask, but named as unlabeled
    source = make_folder_dataset(root=str(folder), class_names=CLASSES)
    assert [path.stem for path in source.unlabeled.paths] == ["img06", "extra1", "loose"]
    with pytest.raises(ValueError, match=r"labeled = 3 conflicts with split file .*splits/labeled\.txt"):
        make_folder_dataset(root=str(folder), class_names=CLASSES, labeled=3)
    (folder / "splits" / "val.txt").write_text("img05\nghost\n")
    with pytest.raises(FileNotFoundError, match=r"val\.txt:2: no image 'ghost' in .*images with a mask in"):
        make_folder_dataset(root=str(folder), class_names=CLASSES)


def test_split_files_with_a_byte_order_mark_or_not_text(folder: Path) -> None:
    (folder / "splits").mkdir()
    labeled = folder / "splits" / "labeled.txt"
    labeled.write_text("img03\r\nimg04\r\n", encoding="utf-8-sig")
    (folder / "splits" / "val.txt").write_bytes(b"\xff\xfe" + "img05\r\n".encode("utf-16-le"))
    source = make_folder_dataset(root=str(folder), class_names=CLASSES)
    assert stems(source.labeled) == ["img03", "img04"] and stems(source.val) == ["img05"]
    labeled.write_bytes((folder / "masks" / "img03.png").read_bytes())
    with pytest.raises(ValueError) as error:
        make_folder_dataset(root=str(folder), class_names=CLASSES)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"split file {labeled} is not UTF-8 text (byte 0x89 at offset 0)")


def test_errors_name_the_file(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"folder .*absent does not exist \(expected a dataset folder"):
        make_folder_dataset(root=str(tmp_path / "absent"), class_names=CLASSES)
    write_image(folder / "images" / "orphan.jpg", 1)
    with pytest.raises(FileNotFoundError, match=r"image .*images/orphan\.jpg has no mask .*masks/orphan\.png"):
        make_folder_dataset(root=str(folder), class_names=CLASSES)
    (folder / "images" / "orphan.jpg").unlink()
    ids = class_ids(3)
    ids[1, 1], ids[2, 2] = 3, 7
    Image.fromarray(ids).save(folder / "masks" / "img03.png")
    message = r"mask .*img03\.png has unknown label values 3, 7; expected class ids 0\.\.2 or 255 \(ignore\)"
    with pytest.raises(ValueError, match=message):
        make_folder_dataset(root=str(folder), class_names=CLASSES)
    lazy = make_folder_dataset(root=str(folder), class_names=CLASSES, labeled=18, check_files=False)
    with pytest.raises(ValueError, match=message):
        lazy.labeled[stems(lazy.labeled).index("img03")]
    Image.fromarray(class_ids(3, size=(4, 4))).save(folder / "masks" / "img03.png")
    with pytest.raises(ValueError, match=r"image .*img03\.jpg is 10x8 but its mask .*img03\.png is 4x4"):
        make_folder_dataset(root=str(folder), class_names=CLASSES)
    Image.fromarray(class_ids(3)).save(folder / "masks" / "img03.png")
    (folder / "unlabeled" / "extra2.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot decode image .*unlabeled/extra2\.jpg"):
        make_folder_dataset(root=str(folder), class_names=CLASSES)


def test_full_check_is_skipped_for_large_datasets(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (folder / "unlabeled" / "extra2.jpg").write_bytes(b"garbage")
    assert FULL_CHECK_LIMIT == 2000
    monkeypatch.setattr("sandbox.data.segmentation_files.FULL_CHECK_LIMIT", 10)
    source = make_folder_dataset(root=str(folder), class_names=CLASSES)  # 23 samples > 10: nothing decoded
    with pytest.raises(ValueError, match="cannot decode image"):
        source.unlabeled[2]


def test_masks_without_a_labeled_pixel_are_refused_up_front(folder: Path) -> None:
    """All-ignore masks trained "successfully" (a loss of 0 at every step, a NaN val mIoU); now one line
    naming the dataset folder and what the masks should hold, for the labeled part and for val."""
    for stem in STEMS:
        Image.fromarray(np.full((SIZE[1], SIZE[0]), IGNORE_INDEX, dtype=np.uint8)).save(folder / "masks" / f"{stem}.png")
    with pytest.raises(ValueError) as error:
        make_folder_dataset(root=str(folder), class_names=CLASSES)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"dataset folder {folder}: none of the 18 labeled masks")
    assert "every pixel is ignore: mask value 255" in message and "expected pixels with class ids 0..2" in message
    for stem in ("img01", "img02"):  # two labeled images with labels: only val (img00, img19) is all ignore
        Image.fromarray(class_ids(1)).save(folder / "masks" / f"{stem}.png")
    with pytest.raises(ValueError, match=rf"^dataset folder {folder}: none of the 2 val masks .*val mIoU would be undefined"):
        make_folder_dataset(root=str(folder), class_names=CLASSES)
    Image.fromarray(class_ids(0)).save(folder / "masks" / "img19.png")
    assert len(make_folder_dataset(root=str(folder), class_names=CLASSES).val) == 2, "one labeled val pixel is enough"
    for stem in STEMS:  # the dataset's own ignore value is named
        Image.fromarray(np.full((SIZE[1], SIZE[0]), 7, dtype=np.uint8)).save(folder / "masks" / f"{stem}.png")
    with pytest.raises(ValueError, match=r"none of the 18 labeled masks .*mask value 7\)"):
        make_folder_dataset(root=str(folder), class_names=CLASSES, ignore_index=7)


def test_a_class_no_mask_holds_is_named_in_a_warning(folder: Path, capsys: pytest.CaptureFixture) -> None:
    """Binary masks saved as 0/255 (the usual way): 255 is the ignore index, so the foreground is never
    learned and the run reported a val mIoU of 100 (the background's) without a word; now one warning
    line names the class. A dataset whose every class appears gets none."""
    make_folder_dataset(root=str(folder), class_names=CLASSES)
    assert "warning" not in capsys.readouterr().err
    for number, stem in enumerate(STEMS):
        binary = np.where(class_ids(number) > 0, IGNORE_INDEX, 0).astype(np.uint8)
        Image.fromarray(binary).save(folder / "masks" / f"{stem}.png")
    make_folder_dataset(root=str(folder), class_names=CLASSES)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: dataset folder {folder}: classes ")
    assert f"{CLASSES[1]!r} (id 1), {CLASSES[2]!r} (id 2) appear in no labeled or val mask" in err and "0/255?" in err


def test_paletted_masks_give_the_colours_predictions_are_drawn_in(folder: Path) -> None:
    """Without a ``palette`` option, the palette of paletted mask PNGs is the dataset's (the VOC map before)."""
    own = [(10, 20, 30), (200, 100, 0), (0, 90, 250)]
    for number, stem in enumerate(STEMS):
        mask = Image.fromarray(class_ids(number)).convert("P")
        mask.putpalette([channel for colour in own for channel in colour] + [255] * (3 * 253))
        mask.save(folder / "masks" / f"{stem}.png")
    source = make_folder_dataset(root=str(folder), class_names=CLASSES)
    assert source.palette == own
    assert torch.equal(source.val[0][1], torch.from_numpy(class_ids(0).astype(np.int64))), "the ids are read as before"
    assert make_folder_dataset(root=str(folder), class_names=CLASSES, palette=PALETTE).palette == [tuple(c) for c in PALETTE]


def test_a_relative_root_is_read_beside_the_recipe(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``root`` was read relative to the working directory, unlike ``base`` and ``plugins``; a root that
    exists only from the working directory (recipes written before) still works."""
    from sandbox.recipe import load_recipe

    recipes, elsewhere = tmp_path / "recipes", tmp_path / "else" / "where"
    recipes.mkdir()
    elsewhere.mkdir(parents=True)
    recipe = recipes / "pets.toml"

    def root_of(root: str, overrides: list[str] | None = None) -> str:
        recipe.write_text(f'[dataset]\nname = "folder"\nroot = "{root}"\nclass_names = ["bg", "cat", "dog"]\n')
        return load_recipe(recipe, overrides).dataset.options()["root"]

    monkeypatch.chdir(elsewhere)
    assert root_of("../data") == str(folder.resolve()), "relative to the recipe, saved as an absolute path"
    assert root_of(str(folder)) == str(folder)
    monkeypatch.chdir(tmp_path)
    assert root_of("data") == "data", "not beside the recipe but in the working directory: as before"
    assert root_of("../data", ["dataset.root=data"]) == "data", "--set is relative to the working directory"
    (recipes / "data").mkdir()
    capsys.readouterr()
    assert root_of("data") == str((recipes / "data").resolve()), "both exist: the recipe's folder wins"
    assert f"[dataset] root = 'data' is {(recipes / 'data').resolve()} (relative to the recipe's folder), not" in capsys.readouterr().err


def test_a_root_in_the_home_folder_is_read_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``root = "~/data"`` is the user's home, as a shell reads it (it was joined to the recipe's folder)."""
    from sandbox.recipe import read_toml

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    recipe = tmp_path / "recipes" / "mine.toml"
    recipe.parent.mkdir()
    recipe.write_text('[dataset]\nname = "folder"\nroot = "~/data"\n')
    assert read_toml(recipe)["dataset"]["root"] == str(tmp_path / "home" / "data")


def test_a_mask_without_a_readable_image_is_named(folder: Path) -> None:
    """An image the dataset does not read (a .tif, a broken link) dropped its mask too, silently: half a
    dataset could vanish; now one line names the mask and what stands in its image's place."""
    write_image(folder / "images" / "img05.jpg", 5)
    (folder / "images" / "img05.jpg").rename(folder / "images" / "img05.tif")
    with pytest.raises(FileNotFoundError, match=r"mask .*masks/img05\.png has no image .*images/img05\.jpg, \.jpeg or "
                                                 r"\.png \(img05\.tif is not read\); expected one image per mask"):
        make_folder_dataset(root=str(folder), class_names=CLASSES)
    (folder / "images" / "img05.tif").unlink()
    (folder / "images" / "img05.jpg").symlink_to(folder / "gone.jpg")
    with pytest.raises(FileNotFoundError, match=r"\(img05\.jpg is a broken link\)"):
        make_folder_dataset(root=str(folder), class_names=CLASSES)
