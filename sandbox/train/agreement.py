"""Errors that every process agrees on: one process's failure ends all of them with the same line.

A process that fails while the others go on would leave them waiting in the next collective
(a barrier, DDP's parameter broadcast) until a timeout, or dying with a transport error that never
says what went wrong. Each process runs a fallible phase inside :func:`agreed_errors`; at its end
every process exchanges its outcome (one small all-gather), and if any failed, all raise the same
:class:`SandboxError`: the message of the lowest-ranked failing process.

The first such block also starts this process's failure watcher (:mod:`sandbox.train.failures`):
a failure between the blocks (``accelerator.prepare``, moving the teacher to its device) ends
every process too, with the line the failing process printed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object

from sandbox.errors import SandboxError, describe_exception, on_process


def raise_if_any_failed(state: Accelerator | PartialState, error: BaseException | None) -> None:
    """Every process calls this at the same point with its own error (or None).

    If any process has one, every process raises ``SandboxError`` with the first failing
    process's one-line description (suffixed with its rank when it is not the main process),
    chained to this process's own error, so ``--debug`` still shows where it came from.
    """
    message = None if error is None else describe_exception(error)
    if state.num_processes == 1:
        failed = [] if message is None else [(0, message)]
    else:
        failed = [(rank, text) for rank, text in enumerate(gather_object([message])) if text is not None]
    if failed:
        rank, text = failed[0]
        raise SandboxError(on_process(text, rank)) from error


@contextmanager
def agreed_errors(state: Accelerator | PartialState) -> Iterator[None]:
    """Run the block on every process; if it fails on any, raise the same one-line error on all.

    Any exception of the block counts (a ``SandboxError`` keeps its message). The block must not
    itself wait for other processes before it can fail.
    """
    from sandbox.train.failures import channel, collective_free

    channel(state.process_index, state.num_processes)  # from here on a failure anywhere ends every process
    error = None
    try:
        with collective_free():  # a peer's failure leaves this process time to reach the exchange
            yield
    except Exception as caught:  # noqa: BLE001 - reported on every process below
        error = caught
    raise_if_any_failed(state, error)
