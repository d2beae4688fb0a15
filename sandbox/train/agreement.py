"""Errors that every process agrees on: one process's failure ends all of them with the same line.

A process that fails while the others go on would leave them waiting in the next collective
(a barrier, DDP's parameter broadcast) until a timeout, or dying with a transport error that never
says what went wrong. Each process runs a fallible set-up block inside :func:`agreed_errors`; at
its end every process learns every outcome, through the launch's key-value store as every other
failure (:func:`sandbox.train.failures.agreed_phase`), and if any failed, all raise the same
:class:`SandboxError`: the message of the lowest-ranked failing process. Without a reachable
store the processes exchange their outcomes in one small all-gather instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object

from sandbox.errors import describe_exception, on_process, shared_error


def raise_if_any_failed(state: Accelerator | PartialState, error: BaseException | None) -> None:
    """Every process calls this at the same point with its own error (or None); one all-gather.

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
        raise shared_error(on_process(text, rank)) from error


@contextmanager
def agreed_errors(state: Accelerator | PartialState) -> Iterator[None]:
    """Run the block on every process; if it fails on any, raise the same one-line error on all.

    Any exception of the block counts (a ``SandboxError`` keeps its message). The block must not
    itself wait for other processes before it can fail.
    """
    from sandbox.train.failures import agreed_phase

    with agreed_phase(state.process_index, state.num_processes) as through_store:
        if through_store:
            yield
            return
        error = None
        try:
            yield
        except Exception as caught:  # noqa: BLE001 - reported on every process below
            error = caught
        raise_if_any_failed(state, error)
