"""Claims: at most one process trains a run of a sweep at a time, on one machine or on many.

``sandbox ablate`` jobs (shards of a SLURM job array, or an accidental duplicate job) share one
ablation folder, usually on a network filesystem. Before training a run, the job's main process
claims it. Two kinds of files in the run directory do it, and nothing else coordinates:

- ``CLAIM``: JSON naming the holder (host, pid, SLURM job id, shard), a random token, when it was
  claimed (the holder's clock, for people to read) and the holder's timeout::

      {"host": "node12", "pid": 4242, "job": "81234", "shard": "3/8", "token": "9f...",
       "claimed_at": "2025-05-01T10:00:00.000+00:00", "timeout_s": 600.0}

  It is written once per holder: created when the run is claimed, replaced when a stale claim is
  taken over, removed when the holder releases it. Nothing rewrites it in between.
- ``CLAIM.alive.<token>``: the holder's heartbeat, created just before ``CLAIM``. A background
  thread sets its modification time every ``timeout_s / REFRESHES_PER_TIMEOUT`` seconds
  (``utime``; it never creates the file again). A refresh touches only this file: however late
  it lands, it cannot bring an old claim back.

Staleness is judged on one clock, the file server's: a claim is *stale* when its heartbeat's
modification time is older than the holder's ``timeout_s`` (default :data:`CLAIM_TIMEOUT_S`, 10
minutes: ten refreshes missed) at the server's "now", which the observer reads as the modification
time of a file it creates for the purpose (``CLAIM.clock.<random>``, removed at once). The
holders' and observers' wall clocks are never compared: skewed clocks do not matter. A ``CLAIM``
without a heartbeat (written by an older version, or a holder killed while releasing it) counts
as refreshed when ``CLAIM`` itself was last modified.

- Creating ``CLAIM`` is atomic: the content goes to a temporary file first, which is then
  hard-linked as ``CLAIM`` (``link`` fails when the name exists: the classic lock of NFS, where
  ``O_EXCL`` was not always atomic; a lost reply is recognised by the temporary file's link count).
  A reader never sees half a claim. On a filesystem without hard links, ``O_CREAT | O_EXCL`` is used.
- Taking over a stale claim: the taker first creates ``CLAIM.takeover.<stale token>.<n>``
  exclusively (the same atomic create; only one taker gets it), checks again that ``CLAIM`` holds
  that token and that it is stale, replaces ``CLAIM`` with its own (a ``rename``: there is never a
  moment without a claim that a third process could fill), and removes the old heartbeat and the
  takeover files. Two takers never both win: the second cannot create the takeover file, or finds
  another token in ``CLAIM`` once it has. A takeover file left by a taker killed in those few
  milliseconds is itself stale once it is older than its writer's timeout (its modification time,
  the server's clock), and the next taker uses the next ``<n>``.
- The claim is released when the run ends: finished, failed, on a Python exception, Ctrl-C, or
  SIGTERM (``scancel``, a job's time limit: see :func:`released_on_sigterm`): the heartbeat is
  removed, then ``CLAIM`` if it still holds this token (under the same takeover file a taker would
  need). Only a kill -9 or a lost machine leaves a claim behind, stale once its timeout has passed;
  the run then resumes from its last checkpoint in the next job.
- A claim whose holder runs on this machine (same host name, boot and pid namespace) and whose
  process is gone (``os.kill(pid, 0)`` fails with ``ProcessLookupError``, or the pid now belongs to a
  process started at another time: pid reuse) is stale at once: a SIGKILLed job's rerun on the same
  machine does not wait for the timeout. The claim records ``process``, ``<boot id>/<pid namespace>/
  <start time in clock ticks>`` (from ``/proc``); without ``/proc`` only the host name and the dead
  pid count (a reused pid then looks alive: the claim waits for its timeout, the safe side).

Fencing: a holder that cannot refresh for the whole timeout (suspended, its filesystem unreachable)
is deemed dead and may be taken over. So that it never writes into a run someone else now trains,
the run directory calls :meth:`ClaimKeeper.check` before each write and again right before it
publishes one (:mod:`sandbox.rundir.directory`: content goes to the holder's own temporary files and a
staging folder named by its token, then a checked ``rename``): it raises a one-line
:class:`SandboxError` when ``CLAIM`` holds another token (taken over, or deleted by hand) or when no
refresh succeeded for half the timeout (measured on the holder's monotonic clock; the taker waits for
the whole of it on the server's). A holder paused for longer than its timeout (SIGSTOP, swap, a slow
save) therefore loses at most its own write. Refresh errors print one warning line (once until a
refresh succeeds again).

What the shared filesystem must provide (local filesystems and NFSv3/v4 with default mount options
do): atomic ``rename`` within a folder; atomic exclusive creation (``link`` or ``O_EXCL``);
modification times set by the server's clock, from ``utime`` with no explicit time as from writes;
and close-to-open consistency (a file opened after another client closed it shows its content and
attributes: the claim and the heartbeats are read by opening them, never from cached attributes).
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
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from sandbox.rundir.atomic_files import temporary_beside, write_atomically, write_new_file
from sandbox.errors import SandboxError
from sandbox.rundir.files import CLAIM_FILE

CLAIM_TIMEOUT_S = 600.0
"""Default seconds without a refresh after which a claim is stale (``--claim-timeout``)."""
REFRESHES_PER_TIMEOUT = 10
"""A holder refreshes its claim this many times per timeout (every minute by default)."""
TIMEOUT_ENV = "SANDBOX_CLAIM_TIMEOUT"
"""Environment variable for the timeout in seconds (the ``--claim-timeout`` option wins)."""
_HELD: set[ClaimKeeper] = set()
"""The claims this process holds (the SIGTERM handler of :func:`released_on_sigterm` releases them)."""
_TAKEOVER = ".takeover."
_ALIVE = ".alive."
_CLOCK = ".clock."
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
    """The content of a ``CLAIM`` file, and, once read from one, when its holder last showed it was alive.

    ``claimed_at`` is the holder's wall clock (for people to read); ``refreshed_at`` is the file
    server's clock (the heartbeat's modification time) and ``where`` the run directory, whose file
    server :meth:`silent_for` asks for "now". A claim made here (:meth:`new`) has ``where`` None and
    counts as refreshed when it was made. Neither takes part in comparisons: a claim is its content.
    """

    host: str
    pid: int
    job: str | None
    shard: str | None
    token: str
    claimed_at: float
    timeout_s: float
    process: str | None = None
    """``<boot id>/<pid namespace>/<start ticks>`` of the holder (see :meth:`holder_is_gone`), if known."""
    refreshed_at: float = field(default=0.0, compare=False)
    """When the holder last refreshed its heartbeat, in seconds since the epoch on the clock of ``where``."""
    where: Path | None = field(default=None, compare=False)
    """The folder of the file the claim was read from (None: made by this process)."""

    @classmethod
    def new(cls, timeout_s: float, shard: str | None = None) -> Claim:
        """A claim by this process, made now."""
        now = _now()
        return cls(socket.gethostname(), os.getpid(), job_id(), shard, uuid.uuid4().hex, now, float(timeout_s),
                   _process_identity(os.getpid()), refreshed_at=now)

    def encode(self) -> bytes:
        """The file's content."""
        data: dict[str, Any] = asdict(self)
        del data["refreshed_at"], data["where"]
        data["claimed_at"] = _iso(self.claimed_at)
        return (json.dumps(data, indent=1) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> Claim:
        """Parse a file's content; raises ``ValueError`` (or ``KeyError``, ``TypeError``) when it is not one.

        ``refreshed_at`` is the holder's ``claimed_at`` until the caller knows better (:func:`read_claim`).
        """
        fields = json.loads(data)
        claimed_at = _seconds(fields["claimed_at"])
        return cls(
            str(fields["host"]), int(fields["pid"]), fields.get("job"), fields.get("shard"), str(fields["token"]),
            claimed_at, float(fields["timeout_s"]), fields.get("process"), refreshed_at=claimed_at,
        )

    def now(self) -> float:
        """Now, on the clock :attr:`refreshed_at` is on: the file server's of :attr:`where` (this machine's
        for a claim made here)."""
        return time.time() if self.where is None else server_now(self.where)

    def silent_for(self, now: float | None = None) -> float:
        """Seconds since the last refresh; ``now`` on the clock of :attr:`refreshed_at` (:meth:`now` when None)."""
        return (self.now() if now is None else now) - self.refreshed_at

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


def heartbeat_path(path: Path, token: str) -> Path:
    """The heartbeat file of the holder of ``token`` beside the claim file ``path``."""
    return path.with_name(f"{path.name}{_ALIVE}{token}")


def modified_at(path: Path) -> float:
    """``path``'s modification time (the file server's clock), read through an open file: on NFS an
    ``open`` revalidates cached attributes (close-to-open consistency), a bare ``stat`` may not."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return os.fstat(descriptor).st_mtime
    finally:
        os.close(descriptor)


def server_now(folder: Path) -> float:
    """Now on the clock of ``folder``'s file server: the modification time of a file created there for
    the purpose (and removed). Where nothing can be created (a read-only copy), this machine's clock."""
    probe = folder / f"{CLAIM_FILE}{_CLOCK}{uuid.uuid4().hex}"
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError:
        return time.time()
    try:
        return os.fstat(descriptor).st_mtime
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)


def read_claim(path: Path, heartbeat: bool = True) -> Claim | None:
    """The claim in ``path``; None when there is none. Its :attr:`~Claim.refreshed_at` is its
    heartbeat's modification time, or, without a heartbeat (or with ``heartbeat`` False: a takeover
    file), the file's own.

    A file that cannot be parsed (damaged by hand, or being written where hard links are not
    available) counts as a claim by an unknown holder, refreshed at the file's modification time,
    with the default timeout: it goes stale, and is then taken over, like any other.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read()
            stat = os.fstat(handle.fileno())
    except FileNotFoundError:
        return None
    try:
        claim = Claim.decode(data)
    except (ValueError, KeyError, TypeError):
        token = f"unreadable-{stat.st_mtime_ns}-{stat.st_size}"
        claim = Claim("unknown", 0, None, None, token, stat.st_mtime, CLAIM_TIMEOUT_S)
    refreshed_at = stat.st_mtime
    if heartbeat:
        try:
            refreshed_at = modified_at(heartbeat_path(path, claim.token))
        except FileNotFoundError:
            pass
    return replace(claim, refreshed_at=refreshed_at, where=path.parent)


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


def beat(path: Path, mine: Claim) -> None:
    """Show that the holder of ``mine`` is alive: set its heartbeat's modification time to the file
    server's now. Never creates the file (``FileNotFoundError`` when it is gone: taken over, removed)."""
    os.utime(heartbeat_path(path, mine.token))


@dataclass(frozen=True)
class Attempt:
    """The outcome of :func:`acquire`."""

    won: bool
    """Whether this process now holds the claim."""
    other: Claim | None
    """The claim of another process: the one that holds the run (not won), or the stale one taken over (won)."""


def acquire(path: Path, mine: Claim, attempts: int = 3) -> Attempt:
    """Claim ``path`` for ``mine``: create it, or take over a stale claim; else report the holder.

    The heartbeat of ``mine`` is created first (a claim is never without one) and removed when the
    claim was not won.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    write_new_file(heartbeat_path(path, mine.token), b"")
    attempt = Attempt(False, None)
    try:
        attempt = _acquire(path, mine, attempts)
    finally:
        if not attempt.won:
            heartbeat_path(path, mine.token).unlink(missing_ok=True)
    return attempt


def _acquire(path: Path, mine: Claim, attempts: int) -> Attempt:
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
    """Replace the stale claim ``stale`` in ``path`` by ``mine`` (whose heartbeat exists).

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
        heartbeat_path(path, stale.token).unlink(missing_ok=True)
        for attempt in range(_MAX_TAKEOVER_FILES):  # nobody can win with the stale token any more
            _lock_name(path, stale.token, attempt).unlink(missing_ok=True)
        return True, None
    finally:
        lock.unlink(missing_ok=True)


def _lock_name(path: Path, token: str, attempt: int) -> Path:
    return path.with_name(f"{path.name}{_TAKEOVER}{token}.{attempt}")


def _lock(path: Path, token: str, content: bytes) -> tuple[Path | None, Claim | None]:
    """Create the exclusive file that lets one process change the claim holding ``token`` (a taker
    of it, or its holder releasing it); ``content`` is that process's own claim.

    Returns the file, or None and the claim of the process holding it now (None when it just finished).
    A file older than its writer's timeout (its writer died; the server's clock) is passed over for the next ``<n>``.
    """
    for attempt in range(_MAX_TAKEOVER_FILES):
        candidate = _lock_name(path, token, attempt)
        if create_exclusive(candidate, content):
            return candidate, None
        rival = read_claim(candidate, heartbeat=False)
        if rival is None:  # that process has finished: the claim may have changed
            return None, None
        if not rival.is_stale():  # another process is changing the claim right now
            return None, rival
    return None, None


def holds(path: Path, mine: Claim) -> bool:
    """Whether ``path`` holds ``mine`` (its token)."""
    current = read_claim(path, heartbeat=False)
    return current is not None and current.token == mine.token


def release(path: Path, mine: Claim) -> None:
    """Remove the heartbeat of ``mine``, then the claim if it is still ``mine`` (under its takeover file:
    never a taker's claim)."""
    heartbeat_path(path, mine.token).unlink(missing_ok=True)
    if not holds(path, mine):
        return
    lock, _ = _lock(path, mine.token, mine.encode())
    if lock is None:  # a taker is at work: the claim is no longer ours to remove
        return
    try:
        if holds(path, mine):
            path.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)


class ClaimKeeper:
    """Holds an acquired claim: refreshes its heartbeat from a background thread, releases it at the
    end, and fences the holder's writes (:meth:`check`).

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
        """When (``time.monotonic``) the last successful refresh (or the claim) was begun."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="sandbox-claim-refresh", daemon=True)

    @property
    def token(self) -> str:
        """The token of the claim held: it names the holder's staging folders (:mod:`sandbox.rundir.directory`)."""
        return self.mine.token

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

    def _still_mine(self) -> bool:
        """Whether ``CLAIM`` still holds this token (else the claim is recorded as lost)."""
        current = read_claim(self.path, heartbeat=False)
        if current is None or current.token != self.mine.token:
            self._lose(current)
            return False
        return True

    def refresh(self) -> bool:
        """Touch the heartbeat; True when it was touched and ``CLAIM`` still holds this token. False (and
        a warning, once) when the claim is no longer ours, or when the touch took longer than half the
        timeout (it does not count: a taker may be at work).

        Only the heartbeat is written, never ``CLAIM``: a refresh that lands late, after a takeover,
        touches a file nobody reads any more (or finds it gone).
        """
        began = time.monotonic()
        try:
            beat(self.path, self.mine)
        except FileNotFoundError:  # removed by a taker (or by hand): whose is the claim now?
            if not self._still_mine():
                return False
            raise
        if not self._still_mine():
            return False
        if time.monotonic() - began > self.mine.timeout_s / 2:  # stalled: a taker may be at work
            return False
        self._refreshed = began
        return True

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
        of it). The run directory calls this before each write and right before publishing one
        (``RunDirectory.check_writable``)."""
        if not self.lost:
            try:
                self._still_mine()
            except OSError:  # unreadable now: the refresh age below decides
                pass
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
        """Stop refreshing and remove the heartbeat and the claim (if still ours)."""
        _HELD.discard(self)
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self.lost:
            heartbeat_path(self.path, self.mine.token).unlink(missing_ok=True)
        else:
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
