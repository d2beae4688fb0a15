"""Turning errors raised while reading data (a corrupt or mismatched file) into one-line errors."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from sandbox.errors import SandboxError


def last_line(message: str) -> str:
    """The last non-empty line: a DataLoader worker wraps the original error in its traceback."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else message


@contextmanager
def data_errors() -> Iterator[None]:
    """Re-raise ``ValueError``/``OSError`` from dataset reads as :class:`SandboxError` (exit 2)."""
    try:
        yield
    except (ValueError, OSError) as error:
        raise SandboxError(f"while reading data: {last_line(str(error))}") from error


def read_batches(loader: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``loader``; errors raised while reading become one-line SandboxErrors.

    Only the reading is covered: errors in the code consuming the batches pass unchanged.
    """
    with data_errors():
        yield from loader
