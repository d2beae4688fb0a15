"""Turning errors raised while reading data (a corrupt or mismatched file) into one-line errors."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from sandbox.errors import SandboxError


def last_line(message: str) -> str:
    """The last non-empty line: a DataLoader worker wraps the original error in its traceback."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else message


class DataError(SandboxError):
    """A dataset's file could not be read (corrupt, mismatched): the training loop says at which step."""


@contextmanager
def data_errors(what: str = "data") -> Iterator[None]:
    """Re-raise ``ValueError``/``OSError`` from reads of ``what`` as :class:`DataError` (exit 2)."""
    try:
        yield
    except (ValueError, OSError) as error:
        raise DataError(f"while reading {what}: {last_line(str(error))}") from error


def read_batches(loader: Iterable[Any], what: str = "data") -> Iterator[Any]:
    """The batches of ``loader`` (``what`` it reads, for messages); errors raised while reading become
    one-line :class:`DataError`s.

    Only the reading is covered: errors in the code consuming the batches pass unchanged.
    """
    with data_errors(what):
        yield from loader
