"""The ``cityscapes`` dataset: Cityscapes fine annotations, 19 evaluation classes.

Layout under ``root``::

    leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png        (or _gtFine_labelTrainIds.png)

``labelIds`` masks are mapped to the 19 ``trainIds`` with the official table (7 road -> 0, ...,
33 bicycle -> 18; every other id, and 255, -> 255 ignore) by one vectorised lookup; ids above 33
are an error. Trees preprocessed to ``labelTrainIds`` (as UniMatch distributes them) are read
as they are: values 0..18 or 255. The decoding follows the name of the file actually read. For a
name (one-field line or listed folder), ``labelIds`` is used when it exists, else
``labelTrainIds``. A two-path line's mask is used as listed when it exists, else the other kind:
UniMatch's lists name ``..._gtFine_labelTrainIds.png``, which an official tree lacks, so its
``..._gtFine_labelIds.png`` is read (through the table) instead.

Splits: ``labeled`` a float = that fraction of the 2975 training images (1/16 -> 186, 1/8 -> 372,
1/4 -> 744, 1/2 -> 1488, rounded up as in UniMatch), an int = that many; drawn with ``seed``;
unlabeled = the other training images; val = all of ``leftImg8bit/val``. ``split_file`` (and
``unlabeled_split_file``) in the UniMatch format (``leftImg8bit/train/... gtFine/train/...``
per line) or one name per line (``aachen_000000_000019``) override the drawing.
See :mod:`sandbox.data.segmentation_files` for the errors and when files are decoded.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from torch import Tensor

from sandbox.data.segmentation_files import (
    ImageFiles,
    LabeledFiles,
    MaskDecoder,
    SplitEntry,
    check_seed,
    draw_labeled,
    find_split_file,
    labeled_count,
    read_split_file,
    require_dir,
    resolve_entries,
    verify_all,
)
from sandbox.api import IGNORE_INDEX, Register, SegmentationSource, hookimpl

CLASS_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
"""The 19 Cityscapes evaluation classes; index = trainId."""

PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip
"""The standard Cityscapes colour of each trainId."""

LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
"""The official labelId -> trainId mapping of the 19 evaluated classes."""

NUM_LABEL_IDS = 34
"""labelIds run 0..33 (unlabeled .. bicycle)."""

LABEL_ID_LOOKUP = tuple(LABEL_ID_TO_TRAIN_ID.get(label_id, IGNORE_INDEX) for label_id in range(NUM_LABEL_IDS))
"""trainId of each labelId 0..33 (255 for the ids not evaluated)."""

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"


class CityscapesMask:
    """Decodes a gtFine mask: ``*_labelTrainIds.png`` as trainIds, anything else as labelIds."""

    def __init__(self) -> None:
        self.label_ids = MaskDecoder(len(CLASS_NAMES), lookup=LABEL_ID_LOOKUP)
        self.train_ids = MaskDecoder(len(CLASS_NAMES))

    def __call__(self, path: Path) -> Tensor:
        """trainIds ``int64`` ``(H, W)`` of mask file ``path`` (255 = ignore)."""
        return (self.train_ids if path.name.endswith(TRAIN_IDS_SUFFIX) else self.label_ids)(path)


def other_mask(image: Path, mask: Path) -> list[Path]:
    """The fallback of a missing gtFine ``mask``: labelTrainIds for labelIds and the reverse (none for other names)."""
    for missing, other in ((LABEL_IDS_SUFFIX, TRAIN_IDS_SUFFIX), (TRAIN_IDS_SUFFIX, LABEL_IDS_SUFFIX)):
        if mask.name.endswith(missing):
            return [mask.with_name(mask.name.removesuffix(missing) + other)]
    return []


class _Layout:
    """Paths of a Cityscapes tree and the name -> file conventions."""

    def __init__(self, root: Path) -> None:
        self.root = require_dir(root, "the Cityscapes folder holding leftImg8bit/ and gtFine/")
        for part in ("train", "val"):
            require_dir(root / "leftImg8bit" / part, f"the {part} images <city>/<name>{IMAGE_SUFFIX}")
            require_dir(root / "gtFine" / part, f"the {part} masks <city>/<name>{LABEL_IDS_SUFFIX}")

    def pair(self, name: str, part: str = "train", city: str = "") -> tuple[Path, Path]:
        """Image and labelIds mask of sample ``name`` (``<city>_<seq>_<frame>``); see :func:`other_mask`."""
        city = city or name.split("_")[0]
        image = self.root / "leftImg8bit" / part / city / f"{name}{IMAGE_SUFFIX}"
        return image, self.root / "gtFine" / part / city / f"{name}{LABEL_IDS_SUFFIX}"

    def by_id(self, token: str, part: str = "train") -> tuple[Path, Path]:
        """Image and mask of a split-file name (``x``, ``<city>/x`` or ``.../<city>/x_leftImg8bit.png``)."""
        path = Path(token)
        name = path.name.removesuffix(".png").removesuffix("_leftImg8bit")
        return self.pair(name, part, path.parent.name)

    def part(self, part: str) -> list[SplitEntry]:
        """Every image of ``leftImg8bit/<part>`` as a ``<city>/<name>`` entry, sorted."""
        folder = self.root / "leftImg8bit" / part
        images = sorted(folder.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise FileNotFoundError(f"folder {folder} holds no images (expected <city>/<name>{IMAGE_SUFFIX})")
        return [SplitEntry("", (f"{image.parent.name}/{image.name}",)) for image in images]


def make_cityscapes(
    root: str = "data/cityscapes",
    labeled: int | float = 0.125,
    split_file: str | None = None,
    unlabeled_split_file: str | None = None,
    seed: int = 0,
    check_files: bool = True,
) -> SegmentationSource:
    """Cityscapes fine (19 classes): labeled a fraction or count of the 2975 training images, val 500.

    ``labeled``: a float = that fraction of ``leftImg8bit/train`` (rounded up), an int = that
    many, drawn with ``seed``. ``split_file`` / ``unlabeled_split_file``: UniMatch-format lists
    overriding the drawing. ``check_files``: decode every file at construction when there are at
    most 2000. See the module docstring.
    """
    layout = _Layout(Path(root))
    check_seed(seed)
    val = resolve_entries(layout.part("val"), layout.root, partial(layout.by_id, part="val"), fallbacks=other_mask)
    train_entries: list[SplitEntry] = []

    def train() -> list[SplitEntry]:
        """Entries of every training image (listed once, and only when needed)."""
        if not train_entries:
            train_entries.extend(layout.part("train"))
        return train_entries

    if split_file is not None:
        entries = read_split_file(find_split_file(split_file, layout.root))
        labeled_pairs = resolve_entries(entries, layout.root, layout.by_id, fallbacks=other_mask)
    else:
        candidates = resolve_entries(train(), layout.root, layout.by_id, fallbacks=other_mask)
        where = str(layout.root / "leftImg8bit" / "train")
        labeled_pairs, _ = draw_labeled(candidates, labeled_count(labeled, len(candidates), where), seed)

    if unlabeled_split_file is not None:
        entries = read_split_file(find_split_file(unlabeled_split_file, layout.root))
    else:
        taken = {image for image, _ in labeled_pairs}
        entries = [entry for entry in train() if layout.by_id(entry.fields[0])[0] not in taken]
    unlabeled_images = [image for image, _ in resolve_entries(entries, layout.root, layout.by_id, need_mask=False)]

    source = SegmentationSource(
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        labeled=LabeledFiles(labeled_pairs, CityscapesMask()),
        unlabeled=ImageFiles(unlabeled_images),
        val=LabeledFiles(val, CityscapesMask()),
        ignore_index=IGNORE_INDEX,
        palette=list(PALETTE),
    )
    verify_all(source, check_files)
    return source


@hookimpl
def sandbox_register_datasets(register: Register) -> None:
    """Register the ``cityscapes`` dataset."""
    register("cityscapes", make_cityscapes)
