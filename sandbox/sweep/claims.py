"""Claims: at most one process trains a run of a sweep at a time, on one machine or on many.

``sandbox ablate`` jobs (shards of a SLURM job array, or an accidental duplicate job) share one
ablation folder, usually on a network filesystem. Before training a run, the job's main process
claims it: the file ``CLAIM`` in the run directory, JSON naming the holder (host, pid, SLURM job
id, shard), a random token, when it was claimed and last refreshed, and the holder's timeout::

    {"host": "node12", "pid": 4242, "job": "81234", "shard": "3/8", "token": "9f...",
     "claimed_at": "2025-05-01T10:00:00.000+00:00", "refreshed_at": "2025-05-01T10:41:00.000+00:00",
     "timeout_s": 600.0}

- Creating it is atomic: the content goes to a temporary file first, which is then hard-linked as
  ``CLAIM`` (``link`` fails when the name exists: the classic lock of NFS, where ``O_EXCL`` was not
  always atomic; a lost reply is recognised by the temporary file's link count). A reader never
  sees half a claim. On a filesystem without hard links, ``O_CREAT | O_EXCL`` is used instead.
- While the run trains, a background thread rewrites the claim (temporary file, then ``rename``)
  every ``timeout_s / REFRESHES_PER_TIMEOUT`` seconds with a new ``refreshed_at``.
- A claim not refreshed for its holder's ``timeout_s`` (default :data:`CLAIM_TIMEOUT_S`, 10 minutes:
  ten refreshes missed) is *stale*: its holder died (kill -9, a node lost). Times are the holders'
  wall clocks, so the machines' clocks must agree to well within the timeout (NTP does).
- Taking over a stale claim: the taker first creates ``CLAIM.takeover.<stale token>.<n>``
  exclusively (the same atomic create; only one taker gets it), checks that ``CLAIM`` still holds
  that stale token, replaces ``CLAIM`` with its own (a ``rename``: there is never a moment without
  a claim that a third process could fill) and removes the takeover files. Two takers never both
  win: the second cannot create the takeover file, or finds another token in ``CLAIM`` once it has.
  A takeover file left by a taker killed in those few milliseconds is itself stale after its
  timeout, and the next taker uses the next ``<n>``.
- The claim is released (removed, if it still holds this token) when the run ends: finished,
  failed, on a Python exception, Ctrl-C, or SIGTERM (``scancel``, a job's time limit: see
  :func:`released_on_sigterm`). Only a kill -9 or a lost machine leaves a claim behind, stale once
  its timeout has passed; the run then resumes from its last checkpoint in the next job.

- A claim whose holder runs on this machine (same host name, boot and pid namespace) and whose
  process is gone (``os.kill(pid, 0)`` fails with ``ProcessLookupError``, or the pid now belongs to a
  process started at another time: pid reuse) is stale at once: a SIGKILLed job's rerun on the same
  machine does not wait for the timeout. The claim records ``process``, ``<boot id>/<pid namespace>/
  <start time in clock ticks>`` (from ``/proc``); without ``/proc`` only the host name and the dead
  pid count (a reused pid then looks alive: the claim waits for its timeout, the safe side).

Fencing: a holder that cannot refresh for the whole timeout (suspended, its filesystem unreachable)
is deemed dead and may be taken over. So that it never writes into a run someone else now trains,
the run directory calls :meth:`ClaimKeeper.check` before each write: it raises a one-line
:class:`SandboxError` when ``CLAIM`` holds another token (taken over, or deleted by hand) or when no
refresh succeeded for half the timeout (the taker waits for the whole of it). A refresh never undoes
a takeover: it takes the same exclusive ``CLAIM.takeover.<its own token>.<n>`` file a taker of its
claim would take, checks under it that ``CLAIM`` still holds its token, and only then replaces it;
a holder stalled for half its timeout while holding that file gives up instead of writing (a
taker can only take the file once the refresher's copy in it is stale). Refresh errors print one
warning line (once until a refresh succeeds again).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from sandbox.atomic_files import temporary_beside, write_atomically, write_new_file
from sandbox.errors import SandboxError
from sandbox.run_files import CLAIM_FILE

CLAIM_TIMEOUT_S = 600.0
"""Default seconds without a refresh after which a claim is stale (``--claim-timeout``)."""
REFRESHES_PER_TIMEOUT = 10
"""A holder refreshes its claim this many times per timeout (every minute by default)."""
TIMEOUT_ENV = "SANDBOX_CLAIM_TIMEOUT"
"""Environment variable for the timeout in seconds (the ``--claim-timeout`` option wins)."""
_HELD: set[ClaimKeeper] = set()
"""The claims this process holds (the SIGTERM handler of :func:`released_on_sigterm` releases them)."""
_TAKEOVER = ".takeover."
_MAX_TAKEOVER_FILES = 100


def _now() -> float:
    """Now, in seconds since the epoch, to the millisecond (as the file holds it)."""
    return round(time.time(), 3)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def _seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _machine() -> str | None:
    """``<boot id>/<pid namespace>`` of this process (Linux), or None: where a pid means one process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}"


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat``), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _process_identity(pid: int) -> str | None:
    """``<boot id>/<pid namespace>/<start ticks>`` of process ``pid`` on this machine, or None."""
    machine, start = _machine(), _start_ticks(pid)
    return None if machine is None or start is None else f"{machine}/{start}"


def job_id() -> str | None:
    """The scheduler's id of this job (``SLURM_JOB_ID``), if any."""
    return os.environ.get("SLURM_JOB_ID") or None


@dataclass(frozen=True)
class Claim:
    """The content of a ``CLAIM`` file (times in seconds since the epoch)."""

    host: str
    pid: int
    job: str | None
    shard: str | None
    token: str
    claimed_at: float
    refreshed_at: float
    timeout_s: float
    process: str | None = None
    """``<boot id>/<pid namespace>/<start ticks>`` of the holder (see :meth:`holder_is_gone`), if known."""

    @classmethod
    def new(cls, timeout_s: float, shard: str | None = None) -> Claim:
        """A claim by this process, made now."""
        now = _now()
        return cls(socket.gethostname(), os.getpid(), job_id(), shard, uuid.uuid4().hex, now, now, float(timeout_s),
                   _process_identity(os.getpid()))

    def encode(self) -> bytes:
        """The file's content."""
        data: dict[str, Any] = asdict(self)
        data["claimed_at"], data["refreshed_at"] = _iso(self.claimed_at), _iso(self.refreshed_at)
        return (json.dumps(data, indent=1) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> Claim:
        """Parse a file's content; raises ``ValueError`` (or ``KeyError``, ``TypeError``) when it is not one."""
        fields = json.loads(data)
        return cls(
            str(fields["host"]), int(fields["pid"]), fields.get("job"), fields.get("shard"), str(fields["token"]),
            _seconds(fields["claimed_at"]), _seconds(fields["refreshed_at"]), float(fields["timeout_s"]),
            fields.get("process"),
        )

    def silent_for(self, now: float | None = None) -> float:
        """Seconds since the last refresh."""
        return (time.time() if now is None else now) - self.refreshed_at

    def is_stale(self, now: float | None = None) -> bool:
        """Whether the holder has not refreshed for longer than its timeout, or its process is gone (it died)."""
        return self.silent_for(now) > self.timeout_s or self.holder_is_gone()

    def holder_is_gone(self) -> bool:
        """Whether the holder ran on this machine and its process no longer exists (a dead or reused pid).

        Only a claim of this host name counts, and when both sides know their ``<boot id>/<pid
        namespace>``, only one of this boot and pid namespace (another container with this host name
        has its own pids: it cannot be told, and its claim waits for its timeout).
        """
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        here = _machine()
        recorded_machine, _, recorded_start = (self.process or "").rpartition("/")
        if self.process and here is not None and recorded_machine != here:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive: another user's process
            pass
        except OSError:
            return False
        if not self.process or here is None:
            return False
        start = _start_ticks(self.pid)
        return start is not None and start != recorded_start  # the pid was reused by a newer process

    def holder(self) -> str:
        """``host:pid`` with the job id and shard when known, e.g. ``node12:4242 (job 81234, shard 3/8)``."""
        extra = [f"job {self.job}" if self.job else "", f"shard {self.shard}" if self.shard else ""]
        extra = [item for item in extra if item]
        return f"{self.host}:{self.pid}" + (f" ({', '.join(extra)})" if extra else "")

    def staleness(self, now: float | None = None) -> str:
        """Why a stale claim is stale: ``silent for 12 min (timeout 10 min)``, or ``silent for 3 s, its
        process is gone`` (see :meth:`holder_is_gone`)."""
        silent = self.silent_for(now)
        if silent > self.timeout_s:
            return f"silent for {duration(silent)} (timeout {duration(self.timeout_s)})"
        return f"silent for {duration(silent)}" + (", its process is gone" if self.holder_is_gone() else "")

    def describe(self, now: float | None = None) -> str:
        """The holder and how long ago it refreshed, e.g. ``node12:4242 (job 81234), refreshed 12 s ago``."""
        return f"{self.holder()}, refreshed {duration(self.silent_for(now))} ago"


def duration(seconds: float) -> str:
    """``12 s``, ``4 min``, ``3.5 h``."""
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def claim_path(run_path: Path) -> Path:
    """The claim file of a run directory."""
    return run_path / CLAIM_FILE


def read_claim(path: Path) -> Claim | None:
    """The claim in ``path``; None when there is none.

    A file that cannot be parsed (damaged by hand, or being written where hard links are not
    available) counts as a claim by an unknown holder, refreshed at the file's modification time,
    with the default timeout: it goes stale, and is then taken over, like any other.
    """
    try:
        data = path.read_bytes()
        stat = path.stat()
    except FileNotFoundError:
        return None
    try:
        return Claim.decode(data)
    except (ValueError, KeyError, TypeError):
        token = f"unreadable-{stat.st_mtime_ns}-{stat.st_size}"
        return Claim("unknown", 0, None, None, token, stat.st_mtime, stat.st_mtime, CLAIM_TIMEOUT_S)


def _temporary(path: Path, data: bytes) -> Path:
    """``data`` in a new file beside ``path``, flushed to disk."""
    temporary = temporary_beside(path)
    write_new_file(temporary, data)
    return temporary


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when this call created it (atomic)."""
    temporary = _temporary(path, data)
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return os.stat(temporary).st_nlink == 2  # NFS: the link was made, its reply lost and retried
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    finally:
        temporary.unlink(missing_ok=True)
    try:  # no hard links here
        write_new_file(path, data)
    except FileExistsError:
        return False
    return True


def replace_file(path: Path, data: bytes) -> None:
    """Replace (or create) ``path`` with ``data`` atomically (a temporary file, then ``rename``)."""
    write_atomically(path, data)


@dataclass(frozen=True)
class Attempt:
    """The outcome of :func:`acquire`."""

    won: bool
    """Whether this process now holds the claim."""
    other: Claim | None
    """The claim of another process: the one that holds the run (not won), or the stale one taken over (won)."""


def acquire(path: Path, mine: Claim, attempts: int = 3) -> Attempt:
    """Claim ``path`` for ``mine``: create it, or take over a stale claim; else report the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        if create_exclusive(path, mine.encode()):
            return Attempt(holds(path, mine), None)
        other = read_claim(path)
        if other is None:  # released in the meantime: try again
            continue
        if not other.is_stale():
            return Attempt(False, other)
        won, rival = take_over(path, other, mine)
        if won:
            return Attempt(holds(path, mine), other)
        current = read_claim(path)  # the takeover may be complete: report the claim now in place
        if current is not None and not current.is_stale():
            return Attempt(False, current)
        if rival is not None:
            return Attempt(False, rival)
    return Attempt(False, read_claim(path))


def take_over(path: Path, stale: Claim, mine: Claim) -> tuple[bool, Claim | None]:
    """Replace the stale claim ``stale`` in ``path`` by ``mine``.

    Returns whether this process won and, when it lost to a process taking over at this moment,
    that process's claim.
    """
    lock, rival = _lock(path, stale.token, mine.encode())
    if lock is None:
        return False, rival
    try:
        current = read_claim(path)
        if current is None or current.token != stale.token or not current.is_stale():
            return False, None
        replace_file(path, mine.encode())
        for attempt in range(_MAX_TAKEOVER_FILES):  # nobody can win with the stale token any more
            _lock_name(path, stale.token, attempt).unlink(missing_ok=True)
        return True, None
    finally:
        lock.unlink(missing_ok=True)


def _lock_name(path: Path, token: str, attempt: int) -> Path:
    return path.with_name(f"{path.name}{_TAKEOVER}{token}.{attempt}")


def _lock(path: Path, token: str, content: bytes) -> tuple[Path | None, Claim | None]:
    """Create the exclusive file that lets one process change the claim holding ``token`` (a taker
    of it, or its holder refreshing or releasing it); ``content`` is that process's own claim.

    Returns the file, or None and the claim of the process holding it now (None when it just finished).
    A file whose content is stale (its writer died) is passed over for the next ``<n>``.
    """
    for attempt in range(_MAX_TAKEOVER_FILES):
        candidate = _lock_name(path, token, attempt)
        if create_exclusive(candidate, content):
            return candidate, None
        rival = read_claim(candidate)
        if rival is None:  # that process has finished: the claim may have changed
            return None, None
        if not rival.is_stale():  # another process is changing the claim right now
            return None, rival
    return None, None


def holds(path: Path, mine: Claim) -> bool:
    """Whether ``path`` holds ``mine`` (its token)."""
    current = read_claim(path)
    return current is not None and current.token == mine.token


def release(path: Path, mine: Claim) -> None:
    """Remove the claim if it is still ``mine`` (under its lock: never a taker's claim)."""
    if not holds(path, mine):
        return
    lock, _ = _lock(path, mine.token, replace(mine, refreshed_at=_now()).encode())
    if lock is None:  # a taker is at work: the claim is no longer ours to remove
        return
    try:
        if holds(path, mine):
            path.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)


class ClaimKeeper:
    """Holds an acquired claim: refreshes it from a background thread, releases it at the end, and
    fences the holder's writes (:meth:`check`).

    Use as a context manager (or :meth:`start` and :meth:`release`); releasing twice is harmless.
    """

    def __init__(self, path: Path, mine: Claim) -> None:
        self.path = path
        self.mine = mine
        self.lost = False
        """Set when the claim no longer holds this token (taken over: this process was deemed dead; or removed)."""
        self.taker: Claim | None = None
        """Who holds the claim since it was lost (None: it was removed)."""
        self.problem: str | None = None
        """The error of the last refresh, while refreshing fails."""
        self._refreshed = time.monotonic()
        """When (``time.monotonic``) the last successful refresh (or the claim) was made."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="sandbox-claim-refresh", daemon=True)

    @property
    def interval_s(self) -> float:
        """Seconds between refreshes."""
        return self.mine.timeout_s / REFRESHES_PER_TIMEOUT

    def start(self) -> ClaimKeeper:
        """Start refreshing."""
        _HELD.add(self)
        self._thread.start()
        return self

    def _lose(self, current: Claim | None) -> None:
        """Record (and say once) that the claim is no longer ours."""
        if self.lost:
            return
        self.lost, self.taker = True, current
        taker = f"now held by {current.holder()}" if current else "removed"
        print(f"warning: the claim {self.path} was taken over ({taker}): this process was silent "
              f"for longer than its {self.mine.timeout_s:g} s timeout", file=sys.stderr, flush=True)

    def refresh(self) -> bool:
        """Write a new ``refreshed_at`` now, if ``CLAIM`` still holds this token; False (and a warning,
        once) when the claim is no longer ours, or when another process is changing it right now.

        Under the claim's exclusive takeover file (see the module's docstring): a takeover and a
        refresh never interleave, so a late refresh cannot restore a claim taken over meanwhile.
        """
        began = time.monotonic()
        fresh = replace(self.mine, refreshed_at=_now())
        lock, _ = _lock(self.path, self.mine.token, fresh.encode())
        if lock is None:  # a taker holds it: it finds this claim fresh, or takes it (seen next time)
            current = read_claim(self.path)
            if current is None or current.token != self.mine.token:
                self._lose(current)
            return False
        try:
            current = read_claim(self.path)
            if current is None or current.token != self.mine.token:
                self._lose(current)
                return False
            if time.monotonic() - began > self.mine.timeout_s / 2:  # stalled: a taker may be at work
                return False
            replace_file(self.path, fresh.encode())
            self.mine = fresh
            self._refreshed = began
            return True
        finally:
            lock.unlink(missing_ok=True)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except OSError as error:  # the filesystem hiccuped: said once, tried again at the next interval
                problem = f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
                if self.problem is None:
                    print(f"warning: the claim {self.path} could not be refreshed: {problem}; retrying every "
                          f"{self.interval_s:g} s (the run stops after {self.mine.timeout_s / 2:g} s without a refresh)",
                          file=sys.stderr, flush=True)
                self.problem = problem
                continue
            self.problem = None
            if self.lost:
                return

    def check(self) -> None:
        """Raise a one-line :class:`SandboxError` unless this process may still write into the run: the
        claim holds this token, and a refresh succeeded within half the timeout (a taker waits for all
        of it). The run directory calls this before each write (``RunDirectory.guard``)."""
        if not self.lost:
            try:
                current = read_claim(self.path)
            except OSError:  # unreadable now: the refresh age below decides
                pass
            else:
                if current is None or current.token != self.mine.token:
                    self._lose(current)
        if self.lost:
            holder = f"now held by {self.taker.holder()}" if self.taker else "removed"
            raise SandboxError(f"the claim {self.path} was taken over ({holder}): this process stops before "
                               "writing into the run again")
        silent = time.monotonic() - self._refreshed
        if silent > self.mine.timeout_s / 2:
            problem = f" ({self.problem})" if self.problem else ""
            raise SandboxError(
                f"the claim {self.path} could not be refreshed for {duration(silent)}{problem}, half its "
                f"{self.mine.timeout_s:g} s timeout: this process stops before another one takes the run over"
            )

    def release(self) -> None:
        """Stop refreshing and remove the claim (if still ours)."""
        _HELD.discard(self)
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if not self.lost:
            release(self.path, self.mine)

    def __enter__(self) -> ClaimKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def released_on_sigterm() -> Iterator[None]:
    """While active, SIGTERM (``scancel``, a job's time limit, a launcher ending its workers) first
    releases every claim this process holds, then ends the process as SIGTERM always does.

    Only in the main thread, and only when nobody else handles SIGTERM; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        for keeper in list(_HELD):
            try:
                keeper.release()
            except OSError:
                pass
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
