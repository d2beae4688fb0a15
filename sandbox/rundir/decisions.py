"""What every process of a job does with one run directory: ``plan`` it from its folder, claim it.

:func:`plan` reads a run directory (``skip`` a finished run, ``resume`` one with a complete
checkpoint, ``start`` others). :func:`claim_run`, on the main process, turns that into a
:class:`Decision` and claims the run when it is to be trained (:mod:`sandbox.rundir.claims`);
:func:`sandbox.processes.agreement.agree_on` tells every process of the job that decision, so that
all of them skip or train the same runs (``sandbox ablate``'s sweeps and ``sandbox run`` alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sandbox.rundir.files import FAILED_MARKER

if TYPE_CHECKING:
    from sandbox.rundir.claims import ClaimKeeper
    from sandbox.rundir.directory import RunDirectory

Action = Literal["skip", "resume", "start"]
"""What a sweep does with one run directory (see :func:`plan`)."""


def plan(run_dir: RunDirectory) -> Action:
    """``skip`` a finished run, ``resume`` one with a complete checkpoint, ``start`` others afresh."""
    if run_dir.summary_file.is_file():
        return "skip"
    if run_dir.recipe_file.is_file() and run_dir.latest_checkpoint() is not None:
        return "resume"
    return "start"


@dataclass(frozen=True)
class Decision:
    """What every process of a job does with one run; the main process decides, the others learn it."""

    action: Literal["start", "resume", "finished", "held", "failed elsewhere", "error"]
    note: str = ""
    """Who holds the run (``held``), the failure (``failed elsewhere``, ``error``), a stale claim taken over."""


def failure_stamp(run_path: Path) -> tuple[int, int] | None:
    """The modification time and size of the run's ``FAILED`` marker, or None without one."""
    try:
        stat = (run_path / FAILED_MARKER).stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def claim_run(
    run_dir: RunDirectory, timeout_s: float, shard: object | None, failed_before: tuple[int, int] | None
) -> tuple[Decision, ClaimKeeper | None]:
    """On the main process: decide what to do with a run; when it is to be trained, claim it first.

    A finished run is skipped; a run claimed by a live process is ``held``; a run that failed in
    another job since this one started (its ``FAILED`` marker is not ``failed_before``) is left
    alone, so that concurrent jobs try each run once (rerun the sweep to retry it). Otherwise the
    claim is returned, refreshing, with ``start`` or ``resume``.
    """
    from sandbox.rundir.claims import Claim, ClaimKeeper, acquire, claim_path

    if plan(run_dir) == "skip":
        return Decision("finished"), None
    path = claim_path(run_dir.path)
    mine = Claim.new(timeout_s, None if shard is None else str(shard))
    attempt = acquire(path, mine)
    if not attempt.won:
        holder = attempt.other.describe() if attempt.other is not None else "another process"
        return Decision("held", f"being trained by {holder}"), None
    keeper = ClaimKeeper(path, mine).start()
    try:
        action = plan(run_dir)  # it may have finished between the first look and the claim
        stamp = failure_stamp(run_dir.path)
        if action == "skip" or (stamp is not None and stamp != failed_before):
            keeper.release()
            if action == "skip":
                return Decision("finished"), None
            failure = (run_dir.path / FAILED_MARKER).read_text().strip()
            return Decision("failed elsewhere", failure), None
        stale = attempt.other
        note = "" if stale is None else (
            f" (took over the stale claim of {stale.holder()}, {stale.staleness()})"
        )
        return Decision(action, note), keeper
    except BaseException:
        keeper.release()
        raise
