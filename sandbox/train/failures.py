"""A failure on one process during training ends every process with the same line, within seconds.

During training the processes keep meeting in collectives (DDP's gradient all-reduce, the
finite-loss check, the density estimator's pooling, evaluation, checkpoint barriers). A process
that raises leaves its peers inside the next one, where they wait for a timeout (NCCL) or die
with a transport error that never says what went wrong (gloo). A collective cannot carry the news
(the peers are already inside another one), so failures travel out of band, through the key-value
store of the launch (the TCPStore at ``MASTER_ADDR:MASTER_PORT`` that every process reaches):

- the failing process records its one-line error, counts itself as failed and waits, at most
  ``ANSWER_TIMEOUT_S``, until every process has answered; the error reported is then that of the
  lowest-ranked failing process (the first one recorded is what the watchers print);
- every process runs a watcher thread that polls the store; when it finds an error while its own
  main thread is still training (so stuck, or about to be, in a collective), it counts the process
  as stopped, prints the same ``error:`` line and ends the process with exit status 2 at once;
- when every process failed by itself (a deterministic error, the usual case) they are still in
  step: all raise the same :class:`SandboxError` and the caller may go on (``sandbox ablate``
  records the run and trains the next one). When any process was stopped by its watcher, or did
  not answer, the process group is unusable: :class:`ProcessGroupLost` ends the command.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, NoReturn

import torch.distributed as dist

from sandbox.errors import SandboxError, describe_exception, error_line

POLL_S = 0.2
"""How often a watcher looks for a peer's error."""
ANSWER_TIMEOUT_S = 15.0
"""How long a failing process waits for every process to answer before it ends the command."""
GRACE_S = 1.0
"""How long a watcher that found a peer's error leaves this process's main thread to fail by itself."""
STORE_TIMEOUT = timedelta(seconds=5)
"""Connecting to the launch store, and each operation on it (all are small)."""

_ERROR, _FAILED, _STOPPED = "error", "failed", "stopped"
_EXITING = "sandbox/exiting"
"""Counts the processes that are ending with an error (once per launch)."""
_watches = itertools.count()
"""Numbers the watches of this process; every process trains the same runs in the same order."""


class ProcessGroupLost(SandboxError):
    """A peer process was ended (or did not answer) after a failure: no collective can run any more."""


@functools.lru_cache(maxsize=1)
def launch_store() -> dist.Store | None:
    """A client of the launch's key-value store (``MASTER_ADDR``/``MASTER_PORT``), or None without one.

    One connection per process (cached). An unreachable store is one warning line: errors during
    training then end the other processes through their own collectives only.
    """
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=STORE_TIMEOUT, wait_for_workers=False)
    except (RuntimeError, ValueError) as error:  # DistStoreError is a RuntimeError
        message = " ".join(str(error).split())[:160]
        print(f"warning: the launch's key-value store {host}:{port} is not reachable ({message}); an error on one "
              "process will not stop the others at once", file=sys.stderr)
        return None


class FailureWatch:
    """Shares this process's training failure with its peers, and ends this process on theirs.

    ``on_stop(message)`` runs in the watcher before this process ends because of a peer's failure
    (e.g. ``sandbox ablate`` records the run as failed); it must not wait for other processes.
    """

    def __init__(
        self, store: dist.Store, rank: int, world_size: int, on_stop: Callable[[str], None] | None = None
    ) -> None:
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.on_stop = on_stop
        self._claim = threading.Lock()  # held by whichever of the main thread and the watcher reports
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sandbox-failure-watch", daemon=True)

    def start(self) -> None:
        """Start watching for a peer's error."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (training ended on this process without an error)."""
        self._stopped.set()
        self._thread.join()

    def fail(self, error: BaseException) -> NoReturn:
        """Record ``error`` for every process, wait for their answers, raise the agreed error.

        Raises :class:`SandboxError` with the first recorded error when every process failed by
        itself, :class:`ProcessGroupLost` when a peer was stopped or did not answer.
        """
        self._claim.acquire()  # if the watcher holds it, it is ending this process already
        self._stopped.set()
        entry = f"{self.rank}\n{describe_exception(error)}"
        try:
            self.store.set(f"{_ERROR}/{self.rank}", entry)
            self.store.compare_set(_ERROR, "", entry)  # the first error recorded alerts the watchers
            self.store.add(_FAILED, 1)
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            while True:
                failed, stopped = self.store.add(_FAILED, 0), self.store.add(_STOPPED, 0)
                if failed + stopped >= self.world_size or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S / 2)
            message = self._message(self._first_by_rank())
        except RuntimeError:  # the store is gone with its host: report this process's own error
            message, failed, stopped = self._message(entry), 0, 1
        if stopped or failed < self.world_size:
            raise ProcessGroupLost(message) from error
        raise SandboxError(message) from error

    def _first_by_rank(self) -> str:
        """The recorded error of the lowest-ranked failing process (the same on every process)."""
        for rank in range(self.world_size):
            if self.store.check([f"{_ERROR}/{rank}"]):
                return self.store.get(f"{_ERROR}/{rank}").decode()
        return self.store.get(_ERROR).decode()

    def _message(self, entry: str) -> str:
        rank, _, text = entry.partition("\n")
        return text if rank == "0" else f"{text} (on process {rank})"

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            try:
                if not self.store.check([_ERROR]):
                    continue
                entry = self.store.get(_ERROR).decode()
            except RuntimeError:  # the store's host ended: this process's own collectives will report
                return
            # a grace period: the same error may be about to reach this process's main thread, which
            # then reports it itself (and the processes stay in step, e.g. for the next ablation run)
            if self._stopped.wait(GRACE_S) or not self._claim.acquire(blocking=False):
                return
            message = self._message(entry)
            try:
                self.store.add(_STOPPED, 1)
                if self.on_stop is not None:
                    self.on_stop(message)
            finally:
                print(error_line(message), file=sys.stderr, flush=True)
                exit_together(SandboxError.exit_code)


def exit_together(exit_code: int) -> NoReturn:
    """End this process of a process group once every process is ending (at most ``ANSWER_TIMEOUT_S``).

    Each process reaching its end counts itself in the launch store and waits for the others, so
    that every process has printed its error line before any exits (on one machine the launcher
    terminates the remaining processes as soon as one of them exits). ``os._exit``: with a peer
    gone, the interpreter's teardown of the process group can abort after the line.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    store = launch_store()
    if store is not None and dist.is_initialized():
        try:
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            world_size = dist.get_world_size()
            ending = store.add(_EXITING, 1)
            while ending < world_size and time.monotonic() < deadline:
                time.sleep(POLL_S / 2)
                ending = store.add(_EXITING, 0)
        except RuntimeError:  # the store's host has ended
            pass
    os._exit(exit_code)


@contextmanager
def shared_failures(
    rank: int, world_size: int, on_stop: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Run a training phase so that an error on any process ends all of them with the same line.

    On one process (or without a launch store) an error simply propagates. Errors raised in the
    block should be :class:`SandboxError`\\ s (their message is the line every process prints).
    """
    store = launch_store() if world_size > 1 else None
    if store is None:
        yield
        return
    watch = FailureWatch(dist.PrefixStore(f"sandbox/failures/{next(_watches)}/", store), rank, world_size, on_stop)
    watch.start()
    try:
        yield
    except Exception as error:  # noqa: BLE001 - shared with every process, then raised again
        watch.fail(error)
    watch.stop()
