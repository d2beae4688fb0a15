"""The ``folder`` dataset: any images + masks laid out in plain folders.

Layout under ``root``::

    images/<stem>.{jpg,jpeg,png}
    masks/<stem>.png             same stem as its image
    unlabeled/<stem>.{jpg,png}   (optional) extra images without masks
    splits/labeled.txt           (optional) one stem per line; likewise unlabeled.txt and val.txt

Masks hold class ids (palette or grayscale PNGs; a value equal to ``ignore_index`` means "no
label" and becomes 255 in the returned masks), or, when a mask is an RGB image, colours matched
exactly against ``palette`` (colour ``i`` = class ``i``). Predictions and figures are drawn in
``palette``; without one, in the palette of the masks when they are paletted PNGs (that of the
first labeled mask), else in the VOC colour map.

Splits, each part independently:

- val: ``splits/val.txt``, else a deterministic 10% (at least 1) of the masked images not named
  in ``splits/labeled.txt``, spread evenly over the sorted stems and independent of ``seed``,
  so every seed is evaluated on the same images.
- labeled: ``splits/labeled.txt``, else ``labeled`` (a count, a fraction, or ``None`` = all)
  of the remaining masked images not named in ``splits/unlabeled.txt``, drawn with ``seed``.
- unlabeled: ``splits/unlabeled.txt`` (stems in ``images/`` or ``unlabeled/``), else the
  remaining masked images plus every image of ``unlabeled/``.

Every image in ``images/`` needs a mask unless ``splits/unlabeled.txt`` names it. When every
file is decoded up front (``check_files``, at most 2000 files), labeled or val masks without a
single labeled pixel (all ``ignore_index``) are an error naming the folder.
See :mod:`sandbox.data.segmentation_files` for the errors and when files are decoded.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from sandbox.data.segmentation_files import (
    ImageFiles,
    LabeledFiles,
    MaskDecoder,
    check_seed,
    color_map,
    draw_labeled,
    labeled_count,
    list_by_stem,
    mask_palette,
    read_split_file,
    require_dir,
    verify_all,
)
from sandbox.api import IGNORE_INDEX, Register, SegmentationSource, hookimpl

SPLIT_NAMES = ("labeled", "unlabeled", "val")
"""The optional split files ``splits/<name>.txt``."""

VAL_FRACTION = 0.1
"""Share of the masked images held out for val when there is no ``splits/val.txt``."""


def evenly_spaced(stems: list[str], count: int) -> list[str]:
    """``count`` of ``stems`` spread evenly over the list (first and last included)."""
    picked = set(np.linspace(0, len(stems) - 1, count).round().astype(int).tolist())
    return [stem for index, stem in enumerate(stems) if index in picked]


def _check_classes(class_names: list[str], palette: list[list[int]] | None, ignore_index: int) -> None:
    """One-line errors for inconsistent class names, palette and ignore index."""
    if not class_names:
        raise ValueError("class_names is empty; give one name per class id")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names has duplicates: {class_names}")
    if 0 <= ignore_index < len(class_names):
        raise ValueError(f"ignore_index = {ignore_index} is a class id (class_names has {len(class_names)} classes)")
    if palette is None:
        return
    if len(palette) != len(class_names):
        raise ValueError(f"palette has {len(palette)} colours but class_names has {len(class_names)} classes")
    for colour in palette:
        if len(colour) != 3 or not all(0 <= value <= 255 for value in colour):
            raise ValueError(f"palette colour {colour} is not three values in 0..255")
    if len({tuple(colour) for colour in palette}) != len(palette):
        raise ValueError("palette has duplicate colours; each class needs its own colour")


def _read_stems(path: Path, known: dict[str, Path], folders: str) -> list[str]:
    """Stems listed in split file ``path``; each must be a key of ``known`` (files in ``folders``)."""
    stems = []
    for entry in read_split_file(path):
        stem = Path(entry.fields[0]).stem if len(entry.fields) == 1 else None
        if stem is None:
            raise ValueError(f"{entry.where}: expected one image stem per line, got {' '.join(entry.fields)!r}")
        if stem not in known:
            raise FileNotFoundError(f"{entry.where}: no image {stem!r} in {folders}")
        stems.append(stem)
    return stems


def make_folder_dataset(
    root: str,
    class_names: list[str],
    palette: list[list[int]] | None = None,
    labeled: int | float | None = None,
    seed: int = 0,
    ignore_index: int = 255,
    check_files: bool = True,
) -> SegmentationSource:
    """Your own images/ + masks/ folders (optional unlabeled/ and splits/*.txt); class ids or palette colours.

    ``labeled``: a count, a fraction, or ``None`` (all) of the non-val masked images, drawn with
    ``seed``, when there is no ``splits/labeled.txt``. ``ignore_index``: the mask value meaning
    "no label". ``check_files``: decode every file at construction when there are at most 2000.
    See the module docstring.
    """
    base = require_dir(Path(root), "a dataset folder holding images/ and masks/")
    images = list_by_stem(require_dir(base / "images", "the images <stem>.jpg or <stem>.png"))
    masks = list_by_stem(require_dir(base / "masks", "the masks <stem>.png, one per image"), (".png",))
    extra_folder = base / "unlabeled"
    extra = list_by_stem(extra_folder) if extra_folder.is_dir() else {}
    _check_classes(class_names, palette, ignore_index)
    check_seed(seed)
    splits = {name: base / "splits" / f"{name}.txt" for name in SPLIT_NAMES}
    present = {name: path for name, path in splits.items() if path.is_file()}
    if labeled is not None and "labeled" in present:
        raise ValueError(f"labeled = {labeled} conflicts with split file {present['labeled']}; drop one of them")

    masked = {stem: path for stem, path in images.items() if stem in masks}
    named_unlabeled = (
        _read_stems(present["unlabeled"], {**images, **extra}, f"{base / 'images'} or {extra_folder}")
        if "unlabeled" in present else []
    )  # fmt: skip
    for stem, path in images.items():
        if stem not in masks and stem not in named_unlabeled:
            raise FileNotFoundError(f"image {path} has no mask {base / 'masks' / (stem + '.png')}")
    for stem, path in masks.items():
        if stem not in images:
            raise FileNotFoundError(orphan_mask(path, base / "images", stem))
    in_images = f"{base / 'images'} with a mask in {base / 'masks'}"
    named_labeled = _read_stems(present["labeled"], masked, in_images) if "labeled" in present else []

    if "val" in present:
        val = _read_stems(present["val"], masked, in_images)
    else:
        excluded = set(named_labeled)
        candidates = [stem for stem in masked if stem not in excluded]
        if not candidates:
            raise ValueError(f"no masked image left in {base / 'images'} for val; add some or write {splits['val']}")
        val = evenly_spaced(candidates, max(1, round(VAL_FRACTION * len(candidates))))
    held_out = set(val)
    rest = [stem for stem in masked if stem not in held_out]

    if "labeled" in present:
        labeled_stems = named_labeled
    else:
        excluded = set(named_unlabeled)
        pool = [stem for stem in rest if stem not in excluded]
        where = f"{base / 'images'} (masked images minus val)"
        count = len(pool) if labeled is None else labeled_count(labeled, len(pool), where)
        if count == 0:
            raise ValueError(f"no masked image left in {base / 'images'} to label once val is held out")
        labeled_stems, _ = draw_labeled(pool, count, seed)

    if "unlabeled" in present:
        unlabeled = [images.get(stem) or extra[stem] for stem in named_unlabeled]
    else:
        taken = set(labeled_stems)
        unlabeled = [masked[stem] for stem in rest if stem not in taken] + list(extra.values())

    decoder = MaskDecoder(len(class_names), ignore_values=(ignore_index,), palette=palette)
    source = SegmentationSource(
        num_classes=len(class_names),
        class_names=list(class_names),
        labeled=LabeledFiles([(masked[stem], masks[stem]) for stem in labeled_stems], decoder),
        unlabeled=ImageFiles(unlabeled),
        val=LabeledFiles([(masked[stem], masks[stem]) for stem in val], decoder),
        ignore_index=IGNORE_INDEX,
        palette=display_palette(palette, [masks[stem] for stem in [*labeled_stems, *val]], len(class_names)),
    )
    verify_all(source, check_files, where=f"dataset folder {base}")
    return source


def orphan_mask(mask: Path, images: Path, stem: str) -> str:
    """Why ``mask`` has no image in the folder ``images``: what is there under its stem (a file of another
    type, a broken link), or nothing; images are ``.jpg``, ``.jpeg`` or ``.png`` (it was dropped silently)."""
    there = sorted(images.glob(f"{glob.escape(stem)}.*"))
    found = "; ".join(
        f"{path.name} is a broken link" if path.is_symlink() and not path.exists() else f"{path.name} is not read"
        for path in there
    )
    return (f"mask {mask} has no image {images / stem}.jpg, .jpeg or .png" + (f" ({found})" if found else "")
            + "; expected one image per mask")


def display_palette(palette: list[list[int]] | None, masks: list[Path], count: int) -> list[tuple[int, int, int]]:
    """The colours predictions and figures are drawn in: ``palette`` when given, else the palette of the
    first of ``masks`` when it is a paletted PNG (the dataset's own colours), else the VOC colour map."""
    if palette is not None:
        return [(colour[0], colour[1], colour[2]) for colour in palette]
    own = mask_palette(masks[0], count) if masks else None
    return own if own is not None else color_map(count)


@hookimpl
def sandbox_register_datasets(register: Register) -> None:
    """Register the ``folder`` dataset."""
    register("folder", make_folder_dataset)
