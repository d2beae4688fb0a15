"""Run a sweep's share of runs, one after another, on every process of the job.

For each run, the main process decides and claims (:mod:`sandbox.rundir.decisions`), every
process learns the decision and skips or trains the run (:mod:`sandbox.sweep.training`); every
write into the run is fenced by the claim. A failing run is recorded and the loop goes on, unless
a peer process has ended. :class:`Tally` counts what happened; the caller reports it.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from sandbox.analysis.report import percent
from sandbox.rundir.files import clear_failure
from sandbox.errors import describe_exception, shared_error
from sandbox.processes.agreement import agree_on
from sandbox.rundir.decisions import claim_run, failure_stamp
from sandbox.sweep.training import combination_recipe, finished_note, mark_failed, may_write, train_one

if TYPE_CHECKING:
    from sandbox.rundir.claims import ClaimKeeper
    from sandbox.sweep.grid import Combination
    from sandbox.sweep.shards import Shard


@dataclass
class Tally:
    """What happened to the runs of one ``sandbox ablate`` process."""

    trained: int = 0
    failed: int = 0
    finished: int = 0
    """Finished already (skipped)."""
    held: int = 0
    """Claimed by another live process (skipped)."""
    failed_elsewhere: int = 0
    """Failed in another job during this sweep (skipped)."""


def run_sweep(
    share: list[tuple[int, tuple[Combination, int]]],
    path: Path,
    overrides: list[str],
    plugins: list[str],
    folder: Path,
    shard: Shard | None,
    claim_timeout: float,
    console: Console,
    debug: bool = False,
) -> Tally:
    """Train the runs of ``share`` not finished nor held by another process, one after another, on every process.

    ``path`` is the sweep's recipe, ``overrides`` and ``plugins`` the user's ``--set`` and
    ``--plugin``, ``folder`` the sweep's folder; ``debug`` prints the traceback of a failing run.
    """
    from sandbox.rundir.claims import released_on_sigterm
    from sandbox.processes.launch import process_state
    from sandbox.processes.failures import ProcessGroupLost
    from sandbox.rundir.directory import RunDirectory, guarded_writes

    state = process_state()
    main = state.is_main_process
    paths = [folder / combination.label / f"seed{seed}" for _, (combination, seed) in share]
    failed_before = {run_path: failure_stamp(run_path) for run_path in paths} if main else {}
    tally = Tally()
    with released_on_sigterm():  # scancel, a time limit: the claim is released before the process ends
        for number, ((_, (combination, seed)), run_path) in enumerate(zip(share, paths), start=1):
            prefix = f"[{number}/{len(share)}] {combination.label} seed{seed}"
            run_dir = RunDirectory(run_path)
            keeper: ClaimKeeper | None = None
            start = time.perf_counter()
            try:
                decision, keeper = agree_on(
                    state, lambda: claim_run(run_dir, claim_timeout, shard, failed_before.get(run_path))
                )
                if decision.action == "finished":
                    note = finished_note(run_dir, path, overrides, plugins, combination, seed, folder)
                    console.print(f"{prefix}: finished already, skipped{note}")
                    tally.finished += 1
                    continue
                if decision.action == "held":
                    console.print(f"{prefix}: {decision.note}, skipped")
                    tally.held += 1
                    continue
                if decision.action == "failed elsewhere":
                    console.print(f"{prefix}: failed in another job during this sweep ({decision.note}), skipped; "
                                  "run the sweep again to retry it")
                    tally.failed_elsewhere += 1
                    continue
                if decision.action == "error":
                    raise shared_error(decision.note)  # the main process's decision, told to every process
                resolved, run_registry = combination_recipe(path, overrides, plugins, combination, seed, folder)
                checkpoint = run_dir.latest_checkpoint()
                resume = decision.action == "resume"
                doing = "resuming from " + checkpoint.name if resume and checkpoint else "training"
                console.print(f"{prefix}: {doing}{decision.note}")
                if main:
                    clear_failure(run_dir.path)
                with guarded_writes(run_dir.path, keeper):  # the claim's fence
                    summary = train_one(resolved, run_registry, resume=resume, release=keeper.release if keeper else None)
            except Exception as error:  # recorded; the sweep goes on (KeyboardInterrupt stops it)
                if debug:
                    traceback.print_exc()
                if main and may_write(keeper):  # every process has the same error (agreed_errors, agree_on)
                    mark_failed(run_dir.path, describe_exception(error), console)
                tally.failed += 1
                console.print(f"{prefix}: FAILED: {describe_exception(error)}")
                if isinstance(error, ProcessGroupLost):  # a peer process has ended: no further run can train
                    raise
                continue
            finally:
                if keeper is not None:
                    keeper.release()
            tally.trained += 1
            console.print(
                f"{prefix}: done, best mIoU {percent(summary['best_miou'])}, final mIoU {percent(summary['final_miou'])} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    return tally
