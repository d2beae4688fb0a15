"""Every process learns every outcome: the one way the processes of a launch agree.

Each process runs a block that waits for no other process inside :func:`agreed`; at its end every
process learns every process's outcome: its error, and the value it set (``outcome.value``, in
``outcome.values`` by rank). If the block failed on any process, all raise the same
:class:`SandboxError`: the message of the lowest-ranked failing process (suffixed with its rank),
chained to this process's own error. The outcomes travel through the launch's key-value store
under the failure watch (:class:`~sandbox.processes.failures.FailureWatch`: a peer that failed
before the block and never comes ends this waiting process once its heartbeat stands still);
without a reachable store (one fallback) in one all-gather. Values travel as JSON either way (a
tuple comes back as a list).

Set-up (:func:`agreed_errors`: a dataset missing on one node, a run-directory conflict), resume (which
checkpoint loads on every process), checkpoints (the staging folder the main process names) and
sweeps (:func:`agree_on`: what the main process decided about a run) all agree through :func:`agreed`.
A failure during a long phase that does wait for peers (training) is shared by
:func:`~sandbox.processes.failures.shared_failures`, through the same store and heartbeat.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object

from sandbox.errors import describe_exception, on_process, shared_error
from sandbox.processes.failures import FailureWatch, channel, collective_free, next_watch

if TYPE_CHECKING:
    from sandbox.rundir.claims import ClaimKeeper
    from sandbox.rundir.decisions import Decision


@dataclass
class Outcome:
    """What a process of an :func:`agreed` block sets (``value``) and learns (``values``)."""

    value: Any = None
    """This process's value (JSON-serialisable), set inside the block."""
    values: list[Any] = field(default_factory=list)
    """Every process's value in rank order, once the block has ended on every process."""


@contextmanager
def agreed(state: Accelerator | PartialState) -> Iterator[Outcome]:
    """Run the block on every process, then give every process every process's outcome (see the module).

    Every process must enter the same :func:`agreed` blocks in the same order (never behind
    ``is_main_process``), and a block must not itself wait for other processes. Any exception of
    the block counts (a ``SandboxError`` keeps its message).
    """
    outcome = Outcome()
    owner = channel(state.process_index, state.num_processes)
    error: BaseException | None = None
    if owner is not None:
        watch = FailureWatch(owner, next_watch())
        try:
            with collective_free():
                yield outcome
        except Exception as caught:  # noqa: BLE001 - every process reports it below
            error = caught
        outcome.values = [json.loads(value) for value in watch.agree(error, json.dumps(outcome.value))]
        return
    try:
        yield outcome
    except Exception as caught:  # noqa: BLE001 - every process reports it below
        error = caught
    entry = json.dumps([None if error is None else describe_exception(error), outcome.value])
    entries = [json.loads(item) for item in ([entry] if state.num_processes == 1 else gather_object([entry]))]
    failed = [(rank, message) for rank, (message, _) in enumerate(entries) if message is not None]
    if failed:
        rank, message = failed[0]
        raise shared_error(on_process(message, rank)) from error
    outcome.values = [value for _, value in entries]


@contextmanager
def agreed_errors(state: Accelerator | PartialState) -> Iterator[None]:
    """Run the block on every process; if it fails on any, raise the same one-line error on all."""
    with agreed(state):
        yield


def main_process_value(state: Accelerator | PartialState, make: Callable[[], Any]) -> Any:
    """``make()``'s value (JSON-serialisable) on the main process, learnt by every process."""
    with agreed(state) as outcome:
        if state.is_main_process:
            outcome.value = make()
    return outcome.values[0]


def agree_on(
    state: Accelerator | PartialState, decide: Callable[[], tuple[Decision, ClaimKeeper | None]]
) -> tuple[Decision, ClaimKeeper | None]:
    """The main process runs ``decide``; every process of the job gets its decision.

    An error while deciding (the shared folder unwritable) becomes an ``error`` decision on every
    process, so that all of them go on in step. The claim keeper exists on the main process only;
    it is released when the processes cannot agree.
    """
    from sandbox.rundir.decisions import Decision

    keeper = None

    def decided() -> dict[str, str]:
        nonlocal keeper
        try:
            decision, keeper = decide()
        except Exception as error:  # noqa: BLE001 - every process reports it
            decision = Decision("error", describe_exception(error))
        return asdict(decision)

    try:
        return Decision(**main_process_value(state, decided)), keeper
    except BaseException:
        if keeper is not None:
            keeper.release()
        raise
