"""A failure on one process ends every process with the same line, within seconds.

The processes keep meeting in collectives (DDP's parameter broadcast and gradient all-reduce, the
finite-loss check, the density estimator's pooling, evaluation, checkpoint barriers). A process
that raises leaves its peers inside the next one, where they wait for a timeout (NCCL) or die
with a transport error that never says what went wrong (gloo). A collective cannot carry the news
(the peers are already inside another one), so failures travel out of band, through the key-value
store of the launch (the TCPStore at ``MASTER_ADDR:MASTER_PORT`` that every process reaches), under
keys of this launch attempt only (``TORCHELASTIC_RUN_ID`` and ``TORCHELASTIC_RESTART_COUNT``: a
restarted attempt never sees the errors of the one before).

One watcher thread per process (started by the first :func:`shared_failures` or
:func:`~sandbox.processes.agreement.agreed` of a process group) looks for errors:

- in a phase run in :func:`shared_failures` (training), the failing process records its one-line
  error, counts itself as failed and waits, at most ``ANSWER_TIMEOUT_S``, until every process has
  answered; the error reported is that of the lowest-ranked failing process;
- a process ending with an error anywhere else (building the model, ``accelerator.prepare``)
  records it on its way out (:func:`exit_together`, or the exception hook for an error that no one
  caught);
- a watcher that finds a peer's error ends its own process only once its main thread is stuck:
  its heartbeat (:func:`beat`, advanced by every training step, and held up by every
  collective-free block, :func:`collective_free`) has not moved for ``STUCK_S``. A main thread that
  keeps moving gets the time to fail by itself. The watcher then runs the exit hooks (trackers'
  ``finish()``, removal of temporary files), ``on_stop`` (``sandbox ablate`` records the run as
  failed and releases its claim), prints the same ``error:`` line and ends the process (status 2);
- when every process failed by itself (a deterministic error, the usual case, even seconds apart)
  they are still in step: all raise the same :class:`SandboxError` and the caller may go on
  (``sandbox ablate`` records the run and trains the next one). When any process was stopped by
  its watcher, or did not answer, the process group is unusable: :class:`ProcessGroupLost`.

Every store call is bounded (``STORE_CALL_S``), even when the store's host stalls.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, NoReturn

import torch.distributed as dist

from sandbox.errors import SandboxError, describe_exception, error_line, on_process, shared_error

POLL_S = 0.2
"""How often a watcher looks for a peer's error."""
ANSWER_TIMEOUT_S = 15.0
"""How long a failing process waits for every process to answer before it ends the command."""
STUCK_S = 5.0
"""How long a main thread's heartbeat must stand still, after a peer failed, before the watcher ends the process."""
STORE_TIMEOUT = timedelta(seconds=5)
"""Connecting to the launch store, and each operation on it (all are small)."""
STORE_CALL_S = STORE_TIMEOUT.total_seconds() + 1.0
"""The longest any one store call may take, whatever the store's host does (then it is given up)."""

_ERROR, _FAILED, _STOPPED, _EXIT, _ANSWERED, _VALUE = "error", "failed", "stopped", "exit", "answered", "value"
_EXITING = "exiting"
"""Counts the processes that are ending with an error (once per launch attempt)."""
_watches = itertools.count()
"""Numbers the phases of this process; every process runs the same phases in the same order."""


def next_watch() -> int:
    """The number of this process's next phase (the same on every process: they run the same phases in order)."""
    return next(_watches)


class ProcessGroupLost(SandboxError):
    """A peer process was ended (or did not answer) after a failure: no collective can run any more."""

    shared = True  # raised by the failing process with the line its peers printed


class StoreUnreachable(RuntimeError):
    """A store call did not return within ``STORE_CALL_S``."""


def bounded(call: Callable[..., Any], *args: Any, timeout: float = STORE_CALL_S) -> Any:
    """``call(*args)`` on a helper thread; :class:`StoreUnreachable` when it has not returned after ``timeout``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call(*args)
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            box["error"] = error

    thread = threading.Thread(target=target, name="sandbox-store-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise StoreUnreachable(f"the launch's key-value store did not answer within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def attempt_scope() -> str:
    """The key prefix of this launch attempt: torchelastic's run id and restart count when launched
    by ``torchrun``/``accelerate launch`` (whose store outlives an attempt), else one per launch."""
    run_id, restart = os.environ.get("TORCHELASTIC_RUN_ID"), os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if run_id is not None and restart is not None:
        return f"sandbox/{run_id}/attempt{restart}/"
    return "sandbox/"  # without an elastic agent the store lives in process 0: it ends with the attempt


def join_restarted_attempt(cpu: bool) -> None:
    """Join the process group of a restarted launch attempt (``TORCHELASTIC_RESTART_COUNT`` > 0) on
    keys of that attempt only.

    The elastic agent's store outlives an attempt, and torch's ``env://`` set-up uses unscoped keys
    there: the processes of attempt 1 would read the addresses of attempt 0's dead processes and
    never connect. Called before Accelerate sets the group up (it keeps one already set up); the
    first attempt, and launches without an elastic agent, are left to Accelerate.
    """
    import torch

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0" or not restart.isdigit() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    if cpu:
        backend = "gloo"
    elif torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=30))
    dist.init_process_group(backend, store=dist.PrefixStore(f"/sandbox/attempt_{restart}/", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


@functools.lru_cache(maxsize=1)
def launch_store() -> dist.Store | None:
    """A client of the launch's key-value store (``MASTER_ADDR``/``MASTER_PORT``) under this attempt's
    prefix, or None without one.

    One connection per process (cached). An unreachable store is one warning line: errors during
    training then end the other processes through their own collectives only.
    """
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        store = bounded(
            lambda: dist.TCPStore(host, int(port), is_master=False, timeout=STORE_TIMEOUT, wait_for_workers=False)
        )
        store.set_timeout(STORE_TIMEOUT)
    except (RuntimeError, ValueError) as error:  # DistStoreError is a RuntimeError
        message = " ".join(str(error).split())[:160]
        print(f"warning: the launch's key-value store {host}:{port} is not reachable ({message}); an error on one "
              "process will not stop the others at once", file=sys.stderr)
        return None
    return dist.PrefixStore(attempt_scope(), store)


class Channel:
    """This process's link to its peers' failures: the heartbeat, the watcher thread, the exit hooks."""

    def __init__(self, store: dist.Store, rank: int, world_size: int) -> None:
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.heartbeat = 0
        self.free = 0
        """How many collective-free blocks the main thread is in (it is then never stuck)."""
        self.phase: FailureWatch | None = None
        self.previous: FailureWatch | None = None
        """The phase this process left last without an error: a peer may still have failed in it."""
        self.on_stop: Callable[[str], None] | None = None
        self.exit_hooks: list[Callable[[], None]] = []
        self.reporting = threading.Lock()  # held by whichever of the main thread and the watcher reports
        self.recorded = False
        self.closed = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="sandbox-failure-watch", daemon=True)
        self.watcher.start()
        atexit.register(self.close)

    def close(self) -> None:
        """Stop watching (the interpreter ends: no store call may run while it tears torch down)."""
        self.closed.set()
        if threading.current_thread() is not self.watcher:
            self.watcher.join(STORE_CALL_S)

    def call(self, name: str, *args: Any) -> Any:
        """A bounded call of the store's method ``name``."""
        return bounded(getattr(self.store, name), *args)

    def record_exit(self, message: str) -> None:
        """Record that this process is ending with ``message`` (the line it printed), once."""
        if self.recorded:
            return
        self.recorded = True
        try:
            self.call("compare_set", _EXIT, "", f"{self.rank}\n{message}")
        except RuntimeError:
            pass

    def run_exit_hooks(self) -> None:
        """Flush trackers, remove temporary files (each hook once; a failing hook is one warning)."""
        hooks, self.exit_hooks = self.exit_hooks, []
        for hook in reversed(hooks):
            try:
                hook()
            except Exception as error:  # noqa: BLE001 - ending anyway
                print(f"warning: cleaning up after the failure: {describe_exception(error)}", file=sys.stderr)

    def _peer_error(self) -> tuple[str | None, FailureWatch | None]:
        """The message of a peer's error this process should react to (or None), and its phase: the
        current phase, or the one this process left last (a peer may have failed in it after this
        process moved on, e.g. moving a module to its device after ``accelerator.prepare``)."""
        for phase in (self.phase, self.previous):
            if phase is not None and not phase.done and self.call("check", [phase.key(_ERROR)]):
                return phase.message(self.call("get", phase.key(_ERROR)).decode()), phase
        if self.call("check", [_EXIT]):
            rank, _, text = self.call("get", _EXIT).decode().partition("\n")
            if rank != str(self.rank):
                return text, None
        return None, None

    def _stuck(self, phase: FailureWatch | None) -> bool:
        """Wait until the main thread is stuck (True), or is reporting the failure itself, or has left
        the phase that failed (False)."""
        last, still_since = self.heartbeat, time.monotonic()
        while not self.closed.is_set():
            if self.reporting.locked() or (phase is not None and (phase.done or phase not in (self.phase, self.previous))):
                return False
            now = time.monotonic()
            if self.heartbeat != last or self.free:
                last, still_since = self.heartbeat, now
            elif now - still_since >= STUCK_S:
                return True
            time.sleep(POLL_S / 2)
        return False

    def _watch(self) -> None:
        while not self.closed.wait(POLL_S):
            try:
                message, phase = self._peer_error()
            except StoreUnreachable:  # the store's host stalls: look again
                continue
            except RuntimeError:  # the store's host ended: this process's own collectives will report
                return
            if message is None or not self._stuck(phase) or self.closed.is_set():
                continue
            if not self.reporting.acquire(blocking=False):
                continue
            try:
                if phase is not None:
                    self.call("add", phase.key(_STOPPED), 1)
                self.recorded = True  # a peer's error, not this process's
                self.run_exit_hooks()
                if self.on_stop is not None:
                    self.on_stop(message)
            except Exception:  # noqa: BLE001 - the line and the exit matter more
                pass
            finally:
                print(error_line(message), file=sys.stderr, flush=True)
                exit_together(SandboxError.exit_code)


_channel: Channel | None = None
_channel_lock = threading.Lock()


def channel(rank: int, world_size: int) -> Channel | None:
    """This process's :class:`Channel` (started on first use), or None on one process or without a store."""
    global _channel
    if world_size <= 1:
        return None
    with _channel_lock:
        if _channel is None:
            store = launch_store()
            if store is None:
                return None
            _channel = Channel(store, rank, world_size)
            _install_excepthook()
        return _channel


def beat() -> None:
    """The main thread moves on (one training step): a peer's failure leaves it time to fail by itself."""
    if _channel is not None:
        _channel.heartbeat += 1


@contextmanager
def collective_free() -> Iterator[None]:
    """A block that waits for no other process: the watcher leaves this process alone while in it."""
    if _channel is None:
        yield
        return
    _channel.free += 1
    try:
        yield
    finally:
        _channel.free -= 1
        _channel.heartbeat += 1


class FailureWatch:
    """One phase (a training run): shares this process's failure with its peers, agreed on by all."""

    def __init__(self, owner: Channel, number: int) -> None:
        self.owner = owner
        self.prefix = f"phase{number}/"
        self.done = False
        """This process has reported the phase's failure itself (the watcher leaves it alone)."""

    def key(self, name: str) -> str:
        return self.prefix + name

    def message(self, entry: str) -> str:
        rank, _, text = entry.partition("\n")
        return on_process(text, int(rank))

    def fail(self, error: BaseException) -> NoReturn:
        """Record ``error`` for every process, wait for their answers, raise the agreed error.

        Raises :class:`SandboxError` with the lowest-ranked process's error when every process
        failed by itself, :class:`ProcessGroupLost` when a peer was stopped or did not answer.
        """
        owner = self.owner
        if isinstance(error, SandboxError) and error.shared:  # every process raised it together: in step
            self.done = True
            raise error
        owner.reporting.acquire()  # if the watcher holds it, it is ending this process already
        entry = self.entry(error)
        try:
            self.record(entry)
            owner.call("add", self.key(_FAILED), 1)
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            while True:
                failed, stopped = owner.call("add", self.key(_FAILED), 0), owner.call("add", self.key(_STOPPED), 0)
                if failed + stopped >= owner.world_size or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S / 2)
            message = self.message(self._first_by_rank())
        except RuntimeError:  # the store is gone with its host, or stalls: report this process's own error
            message, failed, stopped = self.message(entry), 0, 1
        finally:
            self.done = True
            owner.reporting.release()  # in step again (or ending): the watcher may act on a later failure
        if stopped or failed < owner.world_size:
            raise ProcessGroupLost(message) from error
        raise shared_error(message) from error

    def entry(self, error: BaseException) -> str:
        """How this process's ``error`` is recorded: its rank, a newline, its one-line description."""
        return f"{self.owner.rank}\n{describe_exception(error)}"

    def record(self, entry: str) -> None:
        """Record this process's error ``entry``; the phase's first recorded error alerts the watchers."""
        self.owner.call("set", self.key(f"{_ERROR}/{self.owner.rank}"), entry)
        self.owner.call("compare_set", self.key(_ERROR), "", entry)

    def agree(self, error: BaseException | None, value: str = "null") -> list[str]:
        """The end of an agreed phase: every process records its outcome (``error`` or None, and its
        ``value``, a JSON text) and waits for every other's; if any failed, all raise the same
        :class:`SandboxError` (the lowest-ranked failing process's line), else every process's value
        is returned in rank order.

        The wait has no deadline: the phase's blocks wait for no other process, so every process
        reaches this point, unless it failed before the phase, in the enclosing phase or on its way
        out, where it recorded its error: the watcher then ends this waiting process.
        """
        owner = self.owner
        entry = None if error is None else self.entry(error)
        try:
            if entry is not None:
                self.record(entry)
            owner.call("set", self.key(f"{_VALUE}/{owner.rank}"), value)
            answered = owner.call("add", self.key(_ANSWERED), 1)
            while answered < owner.world_size:
                time.sleep(POLL_S / 2)
                try:
                    answered = owner.call("add", self.key(_ANSWERED), 0)
                except StoreUnreachable:  # the store's host stalls: ask again
                    continue
            failed = owner.call("check", [self.key(_ERROR)])
            message = self.message(self._first_by_rank()) if failed else None
            values = [] if failed else [
                owner.call("get", self.key(f"{_VALUE}/{rank}")).decode() for rank in range(owner.world_size)
            ]
        except RuntimeError:  # the store is gone with its host: report this process's own error
            if entry is None:
                raise
            message = self.message(entry)
        finally:
            self.done = True
        if message is not None:
            raise shared_error(message) from error
        return values

    def _first_by_rank(self) -> str:
        """The recorded error of the lowest-ranked failing process (the same on every process)."""
        for rank in range(self.owner.world_size):
            if self.owner.call("check", [self.key(f"{_ERROR}/{rank}")]):
                return self.owner.call("get", self.key(f"{_ERROR}/{rank}")).decode()
        return self.owner.call("get", self.key(_ERROR)).decode()


def _install_excepthook() -> None:
    """An error no one caught, in a process group: the one line on every process, exit status 2."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        if not isinstance(error, Exception) or _channel is None or "--debug" in sys.argv:
            previous(kind, error, trace)
            if _channel is not None and isinstance(error, Exception):
                exit_together(1, describe_exception(error))
            return
        message = on_process(describe_exception(error), _channel.rank)
        print(error_line(message), file=sys.stderr, flush=True)
        exit_together(SandboxError.exit_code, message)

    sys.excepthook = hook


def release_claims() -> None:
    """Give back the run claims this process still holds (``os._exit`` skips the context managers
    that would): after the exit hooks, so that a run is taken over only once its files are whole."""
    claims = sys.modules.get("sandbox.rundir.claims")
    for keeper in list(getattr(claims, "_HELD", ())):
        try:
            keeper.release()
        except Exception:  # noqa: BLE001 - ending anyway; a stale claim is taken over later
            pass


def exit_together(exit_code: int, message: str | None = None) -> NoReturn:
    """End this process of a process group once every process is ending (at most ``ANSWER_TIMEOUT_S``).

    The error this process ends with (``message``, else the exception being handled) is recorded
    first, so that peers not failing by themselves are stopped by their watchers; the exit hooks
    run (trackers flushed, temporary files removed). Each process reaching its end counts itself in
    the launch store and waits for the others, so that every process has printed its error line
    before any exits (on one machine the launcher terminates the remaining processes as soon as one
    of them exits). ``os._exit``: with a peer gone, the interpreter's teardown of the process group
    can abort after the line.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    owner = _channel
    if owner is not None and threading.current_thread() is not owner.watcher:
        if not owner.reporting.acquire(blocking=False):  # the watcher is ending this process
            while True:
                time.sleep(1)
    if owner is not None:
        handled = sys.exc_info()[1]
        if message is None and handled is not None:
            message = str(handled) if isinstance(handled, SandboxError) else describe_exception(handled)
        if message is not None:
            owner.record_exit(" ".join(message.split()))
        owner.run_exit_hooks()
    release_claims()
    store = owner.store if owner is not None else launch_store()
    if store is not None and dist.is_initialized():
        try:
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            world_size = dist.get_world_size()
            ending = bounded(store.add, _EXITING, 1)
            while ending < world_size and time.monotonic() < deadline:
                time.sleep(POLL_S / 2)
                ending = bounded(store.add, _EXITING, 0)
        except RuntimeError:  # the store's host has ended, or stalls
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


@contextmanager
def shared_failures(
    rank: int,
    world_size: int,
    on_stop: Callable[[str], None] | None = None,
    cleanup: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Run a phase (building the trainer, training) so that an error on any process ends all of them
    with the same line.

    ``cleanup`` runs after a failure before this process reports it or ends (trackers flushed,
    temporary files removed); ``on_stop(message)`` runs on a process that a peer's failure ends.
    On one process (or without a launch store) an error simply propagates. Errors raised in the
    block should be :class:`SandboxError`\\ s (their message is the line every process prints).
    Phases may nest (the inner one is watched while it runs).
    """
    owner = channel(rank, world_size)
    if owner is None:
        try:
            yield
        except Exception:
            if cleanup is not None:
                cleanup()
            raise
        return
    watch = FailureWatch(owner, next(_watches))
    outer = owner.phase, owner.on_stop
    owner.phase, owner.on_stop = watch, on_stop if on_stop is not None else owner.on_stop
    if cleanup is not None:
        owner.exit_hooks.append(cleanup)
    failed = False
    try:
        yield
    except Exception as error:  # noqa: BLE001 - shared with every process, then raised again
        failed = True
        owner.run_exit_hooks()
        watch.fail(error)
    finally:
        if owner.phase is watch:
            owner.phase, owner.on_stop = outer
            if not failed:
                owner.previous = watch  # a peer may still fail in it: the watcher keeps looking
        if cleanup in owner.exit_hooks:
            owner.exit_hooks.remove(cleanup)


@contextmanager
def announced_on_sigterm(note: Callable[[], str | None]) -> Iterator[None]:
    """While active, SIGTERM (``scancel``, a job's time limit, ``kill``, a launcher ending its workers)
    first prints ``note()`` on stderr (one line; nothing when it returns None), then does what it did
    before: the handler it replaces (``sandbox run`` and ``sandbox ablate`` release their claims) or,
    without one, ends the process as SIGTERM does.

    Only in the main thread, and only where SIGTERM is not ignored; elsewhere nothing changes.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return

    def announce(signum: int, frame: Any) -> None:
        signal.signal(signum, previous)
        try:
            line = note()
        except Exception:  # noqa: BLE001 - ending anyway: the note is a courtesy
            line = None
        if line:
            try:
                print(line, file=sys.stderr, flush=True)
            except (RuntimeError, OSError, ValueError):  # the handler interrupted a write to stderr
                os.write(2, (line + "\n").encode())
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, announce)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is announce:
            signal.signal(signal.SIGTERM, previous)
