"""The error type for mistakes a user can fix (bad recipe, unknown plugin, missing file)."""

from __future__ import annotations


class SandboxError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits with status 2.

    The message names the file, key or plugin at fault and what was expected.
    """

    exit_code = 2
    shared = False
    """True for an error every process of a group raises with the same message, which already names
    the failing process (see :func:`on_process`); other errors are suffixed when they are printed."""


def shared_error(message: str) -> SandboxError:
    """A :class:`SandboxError` that every process of a group raises with this same ``message``."""
    error = SandboxError(message)
    error.shared = True
    return error


def error_line(message: str) -> str:
    """The line the command line prints for an error: ``error: `` and the message on one line."""
    return "error: " + " ".join(message.split())


def on_process(text: str, rank: int) -> str:
    """``text`` as every process of a group reports it: suffixed with `` (on process R)`` unless R is 0."""
    return text if rank == 0 else f"{text} (on process {rank})"


def describe_exception(error: BaseException) -> str:
    """One line: a ``SandboxError``'s message, else the exception's type and message."""
    text = str(error) if isinstance(error, SandboxError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split()) or type(error).__name__


class PluginError(SandboxError):
    """A plugin failed while the host ran it (it raised, or returned what its contract forbids).

    The message names the plugin (kind, name, provider) and what was wrong.
    """


def lower_first(text: str) -> str:
    """``text`` with its first letter in lower case (a validator's sentence inside our line); quoted
    values keep their case."""
    return text[:1].lower() + text[1:]
