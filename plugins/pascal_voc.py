"""The ``pascal_voc`` dataset: Pascal VOC 2012 segmentation, optionally with the SBD-augmented pool.

Layout under ``root`` (a ``VOC2012`` folder)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        palette PNGs: the palette index is the class id, 255 = boundary
    SegmentationClassAug/<id>.png     (aug=True) class-id PNGs of the SBD-augmented set
    ImageSets/Segmentation/train.txt  the 1464 classic training ids
    ImageSets/Segmentation/val.txt    the 1449 validation ids (the val part)
    ImageSets/Segmentation/train_aug.txt  (optional) the 10582 ids of the augmented pool

Protocols (as in UniMatch / U2PL / DDFP):

- classic: ``labeled`` an int (92, 183, 366, 732 or 1464) = that many images drawn from the 1464
  of ``train.txt`` with ``seed``; unlabeled = the rest of the training pool, which is the 10582
  augmented images with ``aug=True`` (``train_aug.txt``, else every ``SegmentationClassAug``
  mask not in ``val.txt``) and the other classic images without.
- blended: ``labeled`` a float fraction (1/16, 1/8, 1/4, 1/2) of the training pool (the
  augmented pool with ``aug=True``), rounded up.
- explicit: ``split_file`` (and optionally ``unlabeled_split_file``) in the UniMatch format
  (``JPEGImages/x.jpg SegmentationClass/x.png`` per line; a leading ``/`` as in the DeepLab
  ``train_aug.txt`` is fine) or one id per line; ``labeled`` and ``seed`` are then unused, and
  unlabeled defaults to the pool minus the labeled images.

``val_split_file`` (same format and lookup as ``split_file``) replaces
``ImageSets/Segmentation/val.txt`` as the val list. A tree without ``ImageSets/`` (UniMatch's
layout: ``JPEGImages/`` and ``SegmentationClass/`` under the root, the lists in its
``splits/pascal/``) works when ``split_file``, ``unlabeled_split_file`` and ``val_split_file``
are all given; otherwise the error names the missing list.

A labeled image's mask is ``SegmentationClass/<id>.png`` when it exists, else
``SegmentationClassAug/<id>.png``; a val image's is ``SegmentationClass/<id>.png``. A two-path
line's mask is taken as listed when that file exists, else by the same rule: UniMatch's lists name
``SegmentationClass/x.png`` for every image because their ``SegmentationClass`` holds the augmented
masks, and on a standard tree the SBD-only images have theirs in ``SegmentationClassAug/``.
Mask values 0..20 are classes, 255 is kept as ignore; an RGB (colourised) mask is decoded with
the VOC palette, the boundary colour (224, 224, 192) as ignore.
See :mod:`sandbox.data.segmentation_files` for the errors and when files are decoded.
"""

from __future__ import annotations

from pathlib import Path

from sandbox.data.segmentation_files import (
    IMAGE_SUFFIXES,
    ImageFiles,
    LabeledFiles,
    MaskDecoder,
    SplitEntry,
    check_seed,
    color_map,
    draw_labeled,
    find_split_file,
    labeled_count,
    list_by_stem,
    read_split_file,
    require_dir,
    resolve_entries,
    verify_all,
)
from sandbox.api import IGNORE_INDEX, Register, SegmentationSource, hookimpl

CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
"""The 21 VOC class names; index = class id."""

PALETTE = color_map(len(CLASS_NAMES))
"""RGB colour of each class: (0, 0, 0) background, (128, 0, 0) aeroplane, ..."""

BOUNDARY_COLOUR = color_map()[IGNORE_INDEX]
"""Colour of the 255 (boundary) index in VOC palette PNGs: (224, 224, 192)."""

STANDARD_LABEL_COUNTS = (92, 183, 366, 732, 1464)
"""Labeled-image counts of the classic protocol."""

SEGMENTATION_SETS = Path("ImageSets") / "Segmentation"
"""Where the id lists live, relative to the root."""


def voc_mask_decoder() -> MaskDecoder:
    """The decoder of VOC masks: ids 0..20, 255 ignore, RGB masks through the VOC palette."""
    return MaskDecoder(len(CLASS_NAMES), palette=PALETTE, ignore_colours=[BOUNDARY_COLOUR])


ID_LIST_HINTS = {
    "val": "the VOC val ids; on a tree without ImageSets/, as UniMatch's, give val_split_file",
    "train": "the classic training ids; on a tree without ImageSets/ give split_file and unlabeled_split_file",
}
"""What each ``ImageSets/Segmentation`` list is for, in the error for a missing one."""


class _Layout:
    """Paths of a VOC tree and the id -> file conventions; checks only what a part needs."""

    def __init__(self, root: Path) -> None:
        expected = (
            "the VOC2012 folder holding JPEGImages/, SegmentationClass/ "
            "and ImageSets/Segmentation/ unless split files are given"
        )
        self.root = require_dir(root, expected)
        self.images = require_dir(root / "JPEGImages", "the VOC images <id>.jpg")
        self.masks = require_dir(root / "SegmentationClass", "the VOC palette masks <id>.png")
        self.aug_masks = root / "SegmentationClassAug"

    def image(self, sample_id: str) -> Path:
        """The image file of ``sample_id``."""
        return self.images / f"{sample_id}.jpg"

    def pair(self, token: str) -> tuple[Path, Path]:
        """Image and classic mask of a one-field line (``x`` or ``JPEGImages/x.jpg``); see :meth:`labeled_masks`."""
        sample_id = _token_id(token)
        return self.image(sample_id), self.masks / f"{sample_id}.png"

    def labeled_masks(self, image: Path, mask: Path) -> list[Path]:
        """Masks tried for a labeled image whose listed ``mask`` is missing: classic, then augmented."""
        return [self.masks / f"{image.stem}.png", self.aug_masks / f"{image.stem}.png"]

    def val_masks(self, image: Path, mask: Path) -> list[Path]:
        """Masks tried for a val image whose listed ``mask`` is missing: the classic one."""
        return [self.masks / f"{image.stem}.png"]

    def id_list(self, name: str) -> list[SplitEntry]:
        """Entries of ``ImageSets/Segmentation/<name>.txt``; a missing list names what it is for."""
        path = self.root / SEGMENTATION_SETS / f"{name}.txt"
        if not path.exists():
            raise FileNotFoundError(f"split file {path} does not exist ({ID_LIST_HINTS[name]})")
        return read_split_file(path)

    def aug_pool(self, val_ids: set[str]) -> list[SplitEntry]:
        """Entries of the augmented training pool: ``train_aug.txt``, else the augmented masks minus val."""
        listed = self.root / SEGMENTATION_SETS / "train_aug.txt"
        if listed.is_file():
            return read_split_file(listed)
        require_dir(self.aug_masks, "the SBD-augmented masks <id>.png (aug = true)")
        pool = [stem for stem in list_by_stem(self.aug_masks, (".png",)) if stem not in val_ids]
        missing = [stem for stem in pool if not self.image(stem).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(
                f"mask {self.aug_masks / (missing[0] + '.png')} has no image {self.image(missing[0])}{more}"
            )
        return [SplitEntry("", (stem,)) for stem in pool]


def _token_id(token: str) -> str:
    """The VOC id of a one-field line: ``x``, or the stem of an image path ``JPEGImages/x.jpg``."""
    path = Path(token)
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name


def _sample_id(entry: SplitEntry) -> str:
    """The VOC id of a split-file entry: ``x``, ``JPEGImages/x.jpg`` or ``JPEGImages/x.jpg SegmentationClass/x.png``."""
    return _token_id(entry.fields[0])


def _split_entries(name: str | None, layout: _Layout, default: str) -> list[SplitEntry]:
    """Entries of split file ``name`` (see :func:`find_split_file`), else of ``ImageSets/Segmentation/<default>``."""
    return layout.id_list(default) if name is None else read_split_file(find_split_file(name, layout.root))


def make_pascal_voc(
    root: str = "data/VOCdevkit/VOC2012",
    labeled: int | float = 1464,
    aug: bool = False,
    split_file: str | None = None,
    unlabeled_split_file: str | None = None,
    val_split_file: str | None = None,
    seed: int = 0,
    check_files: bool = True,
) -> SegmentationSource:
    """Pascal VOC 2012 (21 classes): classic 1464 or SBD-augmented 10582 training pool, val 1449.

    ``labeled``: an int = that many of the 1464 classic images (classic protocol), a float = that
    fraction of the training pool (blended protocol); drawn with ``seed``. ``split_file`` /
    ``unlabeled_split_file``: UniMatch-format lists overriding the drawing. ``val_split_file``:
    the val list (default ``ImageSets/Segmentation/val.txt``), e.g. UniMatch's
    ``splits/pascal/val.txt``. ``check_files``: decode every file at construction when there are
    at most 2000. See the module docstring.
    """
    layout = _Layout(Path(root))
    check_seed(seed)
    decoder = voc_mask_decoder()
    val_entries = _split_entries(val_split_file, layout, "val")
    val = resolve_entries(val_entries, layout.root, layout.pair, fallbacks=layout.val_masks)
    val_ids = {_sample_id(entry) for entry in val_entries}

    train_txt = layout.root / SEGMENTATION_SETS / "train.txt"
    pool_cache: list[SplitEntry] = []

    def pool() -> list[SplitEntry]:
        """Entries of the training pool (read once, and only when needed)."""
        if not pool_cache:
            pool_cache.extend(layout.aug_pool(val_ids) if aug else layout.id_list("train"))
        return pool_cache

    if split_file is not None:
        entries = read_split_file(find_split_file(split_file, layout.root))
        labeled_pairs = resolve_entries(entries, layout.root, layout.pair, fallbacks=layout.labeled_masks)
    else:
        blended = isinstance(labeled, float)
        if blended and aug:
            entries, where = pool(), f"the augmented pool ({layout.aug_masks} minus val.txt, or train_aug.txt)"
        else:
            entries, where = layout.id_list("train"), str(train_txt)
            if aug:
                where += " (an int is a count of classic images; a float is a fraction of the augmented pool)"
        candidates = resolve_entries(entries, layout.root, layout.pair, fallbacks=layout.labeled_masks)
        labeled_pairs, _ = draw_labeled(candidates, labeled_count(labeled, len(candidates), where), seed)

    if unlabeled_split_file is not None:
        entries = read_split_file(find_split_file(unlabeled_split_file, layout.root))
    else:
        taken = {image.stem for image, _ in labeled_pairs}
        entries = [entry for entry in pool() if _sample_id(entry) not in taken]
    unlabeled_pairs = resolve_entries(entries, layout.root, layout.pair, need_mask=False)
    unlabeled_images = [image for image, _ in unlabeled_pairs]

    source = SegmentationSource(
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        labeled=LabeledFiles(labeled_pairs, decoder),
        unlabeled=ImageFiles(unlabeled_images),
        val=LabeledFiles(val, decoder),
        ignore_index=IGNORE_INDEX,
        palette=list(PALETTE),
    )
    verify_all(source, check_files)
    return source


@hookimpl
def sandbox_register_datasets(register: Register) -> None:
    """Register the ``pascal_voc`` dataset."""
    register("pascal_voc", make_pascal_voc)
