"""Public helpers for dataset plugins that read image and mask files (the built-in ``pascal_voc``,
``cityscapes`` and ``folder`` use them, as a third-party dataset plugin may). :class:`LabeledFiles` and :class:`ImageFiles` are lazy sequences reading
an ``(image, mask)`` pair or an image on ``__getitem__`` (image -> RGB ``uint8`` ``(3, H, W)``,
mask -> ``int64`` ``(H, W)``); they pickle cheaply, for DataLoader workers. :class:`MaskDecoder`
turns a mask PNG into class ids (through a lookup table or a palette). :func:`read_split_file`
and :func:`resolve_entries` read split files in the UniMatch / U2PL format (``image_path
mask_path`` relative to the root per line, or one id per line as in VOC's ``ImageSets``; UTF-8,
with or without a byte-order mark, or UTF-16 with one); a listed mask that does not exist falls
back to the dataset's layout conventions. :func:`labeled_count` and :func:`draw_labeled` make
deterministic splits.

Errors are one line naming the file at fault and what was expected: ``FileNotFoundError`` for
missing files and folders, ``ValueError`` otherwise (the host reports either as ``error: dataset
'<name>' (...): <message>``). Cost policy: construction only lists folders and checks that files
exist and pair up (cheap even for 10k images). Decoding checks (corrupt file, unknown label
values, image/mask size mismatch) run whenever a sample is read, and on every file at
construction (:func:`verify_all`) only when ``check_files`` is true and the dataset holds at most
:data:`FULL_CHECK_LIMIT` samples: small datasets fail early, large ones start without reading
every file first. That full check also refuses a labeled or val part whose masks hold no labeled
pixel at all. :func:`mask_palette` reads the colours of paletted mask PNGs, for display.
"""

from __future__ import annotations

import abc
import operator
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from sandbox.api import IGNORE_INDEX, SegmentationSource

T = TypeVar("T")

FULL_CHECK_LIMIT = 2000
"""Largest number of samples (labeled + unlabeled + val) that ``check_files`` decodes at construction."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""File suffixes (lower case) recognised as images."""

MASK_VALUE_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B")
"""PIL modes whose pixel values are read directly as label values."""

MASK_COLOUR_MODES = ("RGB", "RGBA")
"""PIL modes whose pixel colours are matched against a palette."""


def _describe_values(values: Iterable[int], limit: int = 10) -> str:
    """``"3, 40, 41"`` for a few values, ``"3, 40, ... (25 values)"`` for many."""
    values = [int(v) for v in values]
    shown = ", ".join(str(v) for v in values[:limit])
    return shown if len(values) <= limit else f"{shown}, ... ({len(values)} values)"


def _open(path: Path, what: str, convert: str | None = None) -> Image.Image:
    """Decode ``path`` fully (optionally converting its mode); one-line errors naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(convert) if convert else image.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode {what} {path}: {' '.join(str(error).split())}") from None


def read_image(path: Path) -> Tensor:
    """Image file ``path`` as an RGB ``uint8`` tensor ``(3, H, W)``."""
    return pil_to_tensor(_open(path, "image", "RGB"))


def color_map(count: int = 256) -> list[tuple[int, int, int]]:
    """The VOC colour map (the palette of VOC's mask PNGs), ``count`` entries: (0, 0, 0), (128, 0, 0), ..."""

    def channel(index: int, bit: int) -> int:
        return sum(((index >> (3 * k + bit)) & 1) << (7 - k) for k in range(8))

    return [(channel(index, 0), channel(index, 1), channel(index, 2)) for index in range(count)]


def mask_palette(path: Path, count: int) -> list[tuple[int, int, int]] | None:
    """The colours of class ids ``0..count-1`` in the palette of mask ``path`` when it is a palette
    ("P") PNG with ``count`` distinct colours for them; else None (a grayscale or RGB mask, a short
    palette, or a file that cannot be opened: its own error comes when it is read)."""
    try:
        with Image.open(path) as image:
            flat = image.getpalette() if image.mode == "P" else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    if flat is None or len(flat) < 3 * count:
        return None
    colours = [(flat[3 * index], flat[3 * index + 1], flat[3 * index + 2]) for index in range(count)]
    return colours if len(set(colours)) == count else None


class MaskDecoder:
    """Reads a mask file into class ids (``int64`` ``(H, W)``, ignore = :data:`IGNORE_INDEX`).

    Single-channel masks (palette, grayscale, 16-bit) hold label values: with ``lookup`` a value
    ``v < len(lookup)`` means class ``lookup[v]`` (which may be :data:`IGNORE_INDEX`), without
    it a value is the class id itself. Values in ``ignore_values`` mean "no label". RGB masks
    are matched against ``palette`` (colour ``i`` = class ``i``) and ``ignore_colours``. Any
    other value or colour is an error naming the file and the offending values.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_values: Sequence[int] = (IGNORE_INDEX,),
        lookup: Sequence[int] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_colours: Sequence[Sequence[int]] = (),
    ) -> None:
        self.num_classes = num_classes
        self.ignore_values = tuple(int(v) for v in ignore_values)
        self.lookup = None if lookup is None else np.asarray(lookup, dtype=np.int64)
        self.palette = None if palette is None else [tuple(int(c) for c in colour) for colour in palette]
        self.ignore_colours = [tuple(int(c) for c in colour) for colour in ignore_colours]

    def expected(self) -> str:
        """What the mask values may be, for error messages."""
        ignore = " or ".join(str(v) for v in self.ignore_values)
        if self.lookup is not None:
            return f"label values 0..{len(self.lookup) - 1}" + (f" or {ignore}" if ignore else "")
        return f"class ids 0..{self.num_classes - 1}" + (f" or {ignore} (ignore)" if ignore else "")

    def map_values(self, values: np.ndarray) -> np.ndarray:
        """Class id of each raw label value in ``values`` (non-negative), ``-1`` where unknown."""
        if self.lookup is not None:
            inside = values < len(self.lookup)
            mapped = np.where(inside, self.lookup[np.minimum(values, len(self.lookup) - 1)], -1)
        else:
            mapped = np.where(values < self.num_classes, values, -1)
        mapped[np.isin(values, self.ignore_values)] = IGNORE_INDEX
        return mapped

    def __call__(self, path: Path) -> Tensor:
        """Class ids of mask file ``path``; a one-line ``ValueError`` for unknown values."""
        image = _open(path, "mask")
        if image.mode in MASK_COLOUR_MODES:
            return torch.from_numpy(self._from_colours(np.asarray(image.convert("RGB")), path))
        if image.mode not in MASK_VALUE_MODES:
            raise ValueError(f"mask {path} has image mode {image.mode}; expected a palette, grayscale or RGB PNG")
        raw = np.asarray(image)
        if raw.dtype.itemsize > 2 and raw.size and (int(raw.min()) < 0 or int(raw.max()) > 65535):
            raise ValueError(f"mask {path} has label values outside 0..65535; expected {self.expected()}")
        raw = raw.astype(np.uint16 if raw.dtype.itemsize > 1 else np.uint8, copy=False)  # small lookup tables
        present = np.flatnonzero(np.bincount(raw.ravel())) if raw.size else np.zeros(0, dtype=np.int64)
        mapped = self.map_values(present)
        unknown = present[mapped < 0]
        if unknown.size:
            values = _describe_values(unknown)
            raise ValueError(f"mask {path} has unknown label values {values}; expected {self.expected()}")
        table = np.full(int(present.max(initial=0)) + 1, IGNORE_INDEX, dtype=np.int64)
        table[present] = mapped
        return torch.from_numpy(table[raw])

    def _from_colours(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        """Class ids of an RGB mask ``(H, W, 3)`` by exact colour match."""
        if self.palette is None:
            raise ValueError(
                f"mask {path} is an RGB image but the dataset has no palette; expected single-channel class ids"
            )
        codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        known = {(r << 16) | (g << 8) | b: label for label, (r, g, b) in enumerate(self.palette)}
        known.update({(r << 16) | (g << 8) | b: IGNORE_INDEX for r, g, b in self.ignore_colours})
        colours, inverse = np.unique(codes, return_inverse=True)
        labels = np.array([known.get(int(code), -1) for code in colours], dtype=np.int64)
        if (labels < 0).any():
            bad = [f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in colours[labels < 0][:5].tolist()]
            more = f" and {int((labels < 0).sum()) - 5} more" if (labels < 0).sum() > 5 else ""
            raise ValueError(f"mask {path} has colours not in the palette: {', '.join(bad)}{more}")
        return labels[inverse.reshape(codes.shape)]


class _FileSequence(Sequence[T]):
    """Index handling shared by the lazy file sequences (ints, negative ints, slices)."""

    @abc.abstractmethod
    def load(self, index: int) -> T:
        """Read sample ``index`` (``0 <= index < len(self)``) from disk."""

    def __getitem__(self, index: int | slice) -> T | list[T]:
        """Sample ``index`` read from disk (a list of samples for a slice)."""
        if isinstance(index, slice):
            return [self.load(i) for i in range(*index.indices(len(self)))]
        position = operator.index(index)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self.load(position)


class LabeledFiles(_FileSequence[tuple[Tensor, Tensor]]):
    """``(image, mask)`` pairs read lazily from ``samples`` (image path, mask path)."""

    def __init__(self, samples: Sequence[tuple[Path, Path]], decode_mask: Callable[[Path], Tensor]) -> None:
        self.samples = [(Path(image), Path(mask)) for image, mask in samples]
        self.decode_mask = decode_mask

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.samples)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """Image ``uint8`` ``(3, H, W)`` and mask ``int64`` ``(H, W)`` of pair ``index``."""
        image_path, mask_path = self.samples[index]
        image, mask = read_image(image_path), self.decode_mask(mask_path)
        if tuple(image.shape[1:]) != tuple(mask.shape):
            (height, width), (mask_height, mask_width) = image.shape[1:], mask.shape
            raise ValueError(
                f"image {image_path} is {width}x{height} but its mask {mask_path} is {mask_width}x{mask_height}"
            )
        return image, mask


class ImageFiles(_FileSequence[Tensor]):
    """Images read lazily from ``paths``."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(path) for path in paths]

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    def load(self, index: int) -> Tensor:
        """Image ``index`` as ``uint8`` ``(3, H, W)``."""
        return read_image(self.paths[index])


def require_dir(path: Path, expected: str) -> Path:
    """``path`` if it is a folder, else a ``FileNotFoundError`` saying what it should hold."""
    if not path.is_dir():
        raise FileNotFoundError(f"folder {path} does not exist (expected {expected})")
    return path


def list_by_stem(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Files of ``folder`` with one of ``suffixes`` (case-insensitive), by stem, sorted by stem."""
    found: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            path = Path(entry.path)
            if path.suffix.lower() not in suffixes or not entry.is_file():
                continue
            if path.stem in found:
                other = found[path.stem].name
                raise ValueError(f"two files in {folder} share the name {path.stem!r}: {other} and {path.name}")
            found[path.stem] = path
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split file: where it is (``"file:line"``, empty for a listed file) and its fields."""

    where: str
    fields: tuple[str, ...]


UTF8_BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte-order mark some editors (Notepad, Excel) write at the start of a text file."""

UTF16_BOMS = {b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be"}
"""UTF-16 byte-order marks (Notepad's "Unicode", Windows PowerShell's ``>``) and their encodings."""

TEXT_EXPECTED = "expected a UTF-8 text file (UTF-16 only with a byte-order mark)"
"""What a split file must be, for the encoding errors."""


def _text_encoding(data: bytes) -> tuple[str, int]:
    """Encoding of split-file bytes ``data`` and the length of its byte-order mark (0 if none)."""
    if data.startswith(UTF8_BOM):
        return "utf-8", len(UTF8_BOM)
    for bom, encoding in UTF16_BOMS.items():
        if data.startswith(bom):
            return encoding, len(bom)
    return "utf-8", 0


def read_split_text(path: Path) -> str:
    """Text of split file ``path``: UTF-8 or UTF-16 with a byte-order mark (the mark dropped).

    Anything else (Latin-1 bytes, UTF-16 without a mark, a binary file) is a one-line
    ``ValueError`` naming the file, never a bare ``UnicodeDecodeError``.
    """
    if not path.is_file():
        what = "is a folder, not a split file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"split file {path} {what}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read split file {path}: {error.strerror or error}") from None
    encoding, start = _text_encoding(data)
    try:
        text = data[start:].decode(encoding)
    except UnicodeDecodeError as error:
        offset = start + error.start
        raise ValueError(
            f"split file {path} is not {encoding.upper()} text (byte {data[offset]:#04x} at offset {offset}); "
            f"{TEXT_EXPECTED}"
        ) from None
    if "\x00" in text:
        raise ValueError(f"split file {path} holds NUL characters, so it is not a text file; {TEXT_EXPECTED}")
    return text


def read_split_file(path: Path) -> list[SplitEntry]:
    """Lines of a split file: ``image_path mask_path`` or a single id; blank and ``#`` lines skipped.

    The file is UTF-8 (with or without a byte-order mark) or UTF-16 with a byte-order mark (see
    :func:`read_split_text`); Windows line ends are fine.
    """
    entries = []
    for number, line in enumerate(read_split_text(path).splitlines(), start=1):
        fields = tuple(line.lstrip("\ufeff").split())  # a mark left inside by concatenating files
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise ValueError(f"{path}:{number}: expected 'image_path mask_path' or one id, got {line.strip()!r}")
        entries.append(SplitEntry(f"{path}:{number}", fields))
    if not entries:
        raise ValueError(f"split file {path} lists no samples")
    return entries


def find_split_file(name: str, root: Path) -> Path:
    """A split file given in a recipe: ``name`` as given (relative to the working directory) if it
    exists, else relative to ``root``."""
    path = Path(name)
    if path.is_file() or path.is_absolute():
        return path
    return root / path if (root / path).is_file() else path


def split_path(root: Path, field: str) -> Path:
    """Where a path field of a split file points: relative to ``root``.

    An absolute path is taken as it is when it exists; otherwise it is read relative to ``root``
    too (the DeepLab ``train_aug.txt`` writes ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``).
    """
    path = Path(field)
    if path.is_absolute() and not path.exists():
        return root / path.relative_to(path.anchor)
    return root / path


MaskFallbacks = Callable[[Path, Path], Sequence[Path]]
"""``(image, listed mask) -> masks to try, in order, when the listed mask does not exist``."""


def existing_mask(image: Path, mask: Path, fallbacks: MaskFallbacks | None, where: str = "") -> Path:
    """``mask`` if it exists, else the first existing fallback; else a ``FileNotFoundError`` naming all tried."""
    if mask.is_file():
        return mask
    tried = [path for path in dict.fromkeys(fallbacks(image, mask) if fallbacks else ()) if path != mask]
    for path in tried:
        if path.is_file():
            return path
    nor = f", nor the fallback {' or '.join(str(path) for path in tried)}" if tried else ""
    raise FileNotFoundError(f"{where}image {image} has no mask ({mask} does not exist{nor})")


def resolve_entries(
    entries: Iterable[SplitEntry],
    root: Path,
    by_id: Callable[[str], tuple[Path, Path]],
    need_mask: bool = True,
    fallbacks: MaskFallbacks | None = None,
) -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths of split-file ``entries``; every image (and mask if ``need_mask``) must exist.

    Two-field lines are paths relative to ``root`` (see :func:`split_path`); a one-field line is
    an id that ``by_id`` turns into paths. A mask that does not exist is replaced by the first
    existing one of ``fallbacks(image, mask)`` (the dataset's layout conventions), for both kinds
    of line: a listed path is used as it is whenever it exists.
    """
    pairs = []
    for entry in entries:
        if len(entry.fields) == 2:
            image, mask = split_path(root, entry.fields[0]), split_path(root, entry.fields[1])
        else:
            image, mask = by_id(entry.fields[0])
        where = f"{entry.where}: " if entry.where else ""
        if not image.is_file():
            raise FileNotFoundError(f"{where}image {image} does not exist")
        pairs.append((image, existing_mask(image, mask, fallbacks, where) if need_mask else mask))
    return pairs


def check_seed(seed: int) -> int:
    """``seed`` if it is a non-negative integer."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed


def labeled_count(labeled: int | float, pool_size: int, pool: str) -> int:
    """How many labeled images ``labeled`` asks for: an int is a count, a float a fraction of the pool.

    A fraction rounds up (1/16 of 10582 is 662 and of 2975 is 186, as in the UniMatch splits).
    ``pool`` names the pool in the error for asking more than it holds.
    """
    if isinstance(labeled, bool) or not isinstance(labeled, (int, float)):
        raise ValueError(f"labeled must be an integer count or a fraction in (0, 1], got {labeled!r}")
    if isinstance(labeled, float):
        if not 0.0 < labeled <= 1.0:
            raise ValueError(f"labeled = {labeled}: a fraction must be in (0, 1] (an integer is a count)")
        count = max(1, int(np.ceil(labeled * pool_size - 1e-9)))
    else:
        count = labeled
    if count < 1:
        raise ValueError(f"labeled = {labeled}: need at least one labeled image")
    if count > pool_size:
        raise ValueError(f"labeled = {labeled} asks for {count} labeled images but {pool} holds only {pool_size}")
    return count


def draw_labeled(items: Sequence[T], count: int, seed: int) -> tuple[list[T], list[T]]:
    """``count`` of ``items`` drawn without replacement from ``seed``, and the rest; both keep ``items``' order."""
    chosen = np.zeros(len(items), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(items))[:count]] = True
    return [x for x, c in zip(items, chosen) if c], [x for x, c in zip(items, chosen) if not c]


def verify_all(source: SegmentationSource, check_files: bool, limit: int | None = None, where: str = "the dataset") -> bool:
    """Read every sample of ``source`` (raising its one-line error) when ``check_files`` and it is small.

    Returns whether the check ran: only when the three parts hold at most ``limit`` (default
    :data:`FULL_CHECK_LIMIT`) samples. Then a labeled or val part whose masks hold no labeled
    pixel at all (every pixel ``source.ignore_index``) is a one-line ``ValueError`` starting with
    ``where`` (e.g. ``dataset folder data/``): training would see a loss of 0 at every step, and
    the val mIoU would be undefined.
    """
    total = len(source.labeled) + len(source.unlabeled) + len(source.val)
    if not check_files or total > (FULL_CHECK_LIMIT if limit is None else limit):
        return False
    present: set[int] = set()
    for name, part in (("labeled", source.labeled), ("val", source.val)):
        labeled_pixels = 0
        for index in range(len(part)):
            mask = part[index][1]
            values = mask[mask != source.ignore_index].unique().tolist()
            labeled_pixels += bool(values)
            present.update(int(value) for value in values)
        if len(part) and not labeled_pixels:
            raise ValueError(f"{where}: {_all_ignore(name, part, source)}")
    for index in range(len(source.unlabeled)):
        source.unlabeled[index]
    absent = [index for index in range(source.num_classes) if index not in present]
    if absent:
        print(f"warning: {where}: {_absent_classes(absent, source)}", file=sys.stderr)
    return True


def _absent_classes(absent: list[int], source: SegmentationSource) -> str:
    """The warning for classes that no labeled or val mask holds (their IoU is undefined, the mIoU is the
    other classes'): often masks saved as 0/255, whose 255 is the ignore index."""
    names = ", ".join(f"{source.class_names[index]!r} (id {index})" if index < len(source.class_names) else f"id {index}"
                      for index in absent)
    one = len(absent) == 1
    return (
        f"{'class' if one else 'classes'} {names} {'appears' if one else 'appear'} in no labeled or val mask: "
        f"{'it is' if one else 'they are'} never learned and {'its IoU is' if one else 'their IoUs are'} undefined, so the "
        f"mIoU is that of the other classes (masks saved as 0/{source.ignore_index}? {source.ignore_index} is the ignore index)"
    )


def _all_ignore(name: str, part: Sequence[tuple[Tensor, Tensor]], source: SegmentationSource) -> str:
    """Why a ``name`` part (``labeled`` or ``val``) whose every mask pixel is ignore cannot be used, and what
    its masks should hold."""
    decoder = getattr(part, "decode_mask", None)
    raw = ""
    if isinstance(decoder, MaskDecoder) and decoder.lookup is None and decoder.ignore_values:
        raw = f": mask value {' or '.join(str(value) for value in decoder.ignore_values)}"
    folders = sorted({str(mask.parent) for _, mask in getattr(part, "samples", ())})
    found = f" (in {', '.join(folders)})" if folders else ""
    harm = "nothing to train on (a loss of 0 at every step)" if name == "labeled" else "the val mIoU would be undefined"
    return (
        f"none of the {len(part)} {name} masks{found} holds a labeled pixel (every pixel is ignore{raw}): {harm}; "
        f"expected pixels with class ids 0..{source.num_classes - 1}"
    )
