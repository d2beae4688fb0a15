"""Every file the sandbox writes for others to read, written one way: whole or not at all, durably.

One rule: a file is written to a temporary name beside it, flushed to disk (``fsync``), renamed
over its final name, and the folder is flushed too, so that after a crash of the machine a file
that exists is complete, and a file written after it (a checkpoint's ``COMPLETE`` marker, a claim)
never reaches the disk before it. New files get the permissions of the user's umask (as any file
``open`` creates), never ``mkstemp``'s 0600. Imports no torch: ``sandbox ablate --list`` and
``sandbox compare`` read runs without it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

TEMPORARY_MARK = ".tmp."
"""In the name of every temporary file (``.<name>.tmp.<random>``): :func:`remove_temporaries` finds them."""


def temporary_beside(path: Path) -> Path:
    """A new, unused temporary name in ``path``'s folder."""
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{uuid.uuid4().hex}")


def write_new_file(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Create ``path`` (``FileExistsError`` if it exists) with ``data`` (bytes, or a function writing
    to the open file), flushed to disk; mode 0666 less the umask."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def fsync_directory(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(descriptor)


def write_atomically(
    path: Path, data: bytes | Callable[[BinaryIO], None], before_publish: Callable[[], None] | None = None
) -> None:
    """Replace (or create) ``path`` with ``data``: a flushed temporary file renamed over it, then the
    folder flushed. Readers see the old file or the new one, never a part; an error leaves no temporary.

    ``before_publish`` is called between the temporary file's last byte and the rename (a claim
    holder's fence: it raises to keep the file from being published, and the temporary is removed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_beside(path)
    try:
        write_new_file(temporary, data)
        if before_publish is not None:
            before_publish()
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder``, then the folders: what another writer (``save_state``) wrote
    reaches the disk before a marker written after this call."""
    for root, _, files in os.walk(folder):
        for name in files:
            descriptor = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_directory(Path(root))


def remove_temporaries(folder: Path, keep: Callable[[str], bool] = lambda name: False) -> list[Path]:
    """Delete the temporary files that interrupted writes left directly in ``folder`` (except those whose
    name ``keep`` accepts: another writer's, such as a claim's); return them.

    Only the folder's one writer calls this (a run's main process, holding its claim).
    """
    removed = []
    for path in folder.glob(f".*{TEMPORARY_MARK}*"):
        if path.is_file() and not keep(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
