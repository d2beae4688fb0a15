"""The error type for mistakes a user can fix (bad recipe, unknown plugin, missing file)."""

from __future__ import annotations


class SandboxError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits with status 2.

    The message names the file, key or plugin at fault and what was expected.
    """

    exit_code = 2


def error_line(message: str) -> str:
    """The line the command line prints for an error: ``error: `` and the message on one line."""
    return "error: " + " ".join(message.split())
