"""``sandbox run``: train a recipe into its run directory (or resume it).

One run, one writer: before anything is written, the main process claims the run directory as
``sandbox ablate`` claims a run of a sweep (:mod:`sandbox.rundir.claims`), and tells the other
processes of the launch the outcome (:func:`~sandbox.processes.agreement.agree_on`). A run held by a live process is refused with
one line naming the holder (``--overwrite`` and ``--resume`` too); every write into the run is
fenced by the claim; the claim is released at the end, on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console

from sandbox.analysis.report import percent
from sandbox.cli.common import PluginOption, RecipeArgument, SetOption
from sandbox.rundir.claims import CLAIM_TIMEOUT_S, TIMEOUT_ENV

if TYPE_CHECKING:
    from sandbox.recipe import Recipe
    from sandbox.registry import Registry
    from sandbox.rundir.claims import ClaimKeeper
    from sandbox.rundir.decisions import Decision


def run(
    recipe: Path = RecipeArgument,
    set_: Optional[List[str]] = SetOption,
    plugin: Optional[List[str]] = PluginOption,
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    claim_timeout: float = typer.Option(
        CLAIM_TIMEOUT_S, "--claim-timeout", envvar=TIMEOUT_ENV, show_default=True,
        help="Seconds without a refresh after which this run's claim counts as stale (refreshed every tenth).",
    ),
) -> None:
    """Train, evaluate and checkpoint a recipe; outputs go to <output_dir>/<name>/seed<seed>/."""
    from sandbox.errors import SandboxError, shared_error
    from sandbox.plugins import load_run_recipe
    from sandbox.rundir.claims import released_on_sigterm
    from sandbox.processes.agreement import agree_on
    from sandbox.processes.launch import process_state
    from sandbox.rundir.directory import RunDirectory, guarded_writes

    if resume and overwrite:
        raise SandboxError("--resume and --overwrite contradict each other: --resume continues the run, "
                           "--overwrite replaces it; give one")
    if not claim_timeout > 0:
        raise SandboxError(f"--claim-timeout {claim_timeout:g}: expected a positive number of seconds")
    resolved, registry = load_run_recipe(recipe, set_, plugin)  # a component gone: the package its run used
    run_path = RunDirectory.for_recipe(resolved).path
    state = process_state()
    created = first_missing(run_path) if state.is_main_process else None
    with released_on_sigterm():  # scancel, kill: the claim is released before the process ends
        decision, keeper = agree_on(state, lambda: claim_run_directory(run_path, claim_timeout))
        try:
            if decision.action in ("held", "error"):
                raise shared_error(decision.note)  # the main process's decision, told to every process
            with guarded_writes(run_path, keeper):
                train_claimed(resolved, registry, resume, overwrite, decision.note, keeper)
        finally:
            if keeper is not None:
                keeper.release()
                remove_empty(run_path, created)


def train_claimed(
    resolved: Recipe, registry: Registry, resume: bool, overwrite: bool, note: str, keeper: ClaimKeeper | None
) -> None:
    """Train the run whose claim this process (its main process) holds."""
    from sandbox.train.loop import start_run

    console = Console(stderr=True, markup=False)  # paths and messages as written
    if note and keeper is not None:
        console.print(note, highlight=False, soft_wrap=True)
    on_stop = (lambda message: keeper.release()) if keeper is not None else None
    trainer = start_run(resolved, registry, resume=resume, overwrite=overwrite, on_stop=on_stop)
    run_dir = trainer.run_dir
    if trainer.accelerator.is_main_process:
        console.print(f"run directory: {run_dir.path}", highlight=False, soft_wrap=True)
    summary = trainer.train(resume=resume, on_stop=on_stop)
    if trainer.accelerator.is_main_process:
        console.print(
            f"done: final mIoU {percent(summary['final_miou'])}, best mIoU {percent(summary['best_miou'])} "
            f"(step {summary['best_step']}), {summary['wall_time_s']:.0f} s{skipped_note(summary)}; "
            f"run directory: {run_dir.path}",
            highlight=False,
            soft_wrap=True,
        )


def claim_run_directory(run_path: Path, timeout_s: float) -> tuple[Decision, ClaimKeeper | None]:
    """On the main process: claim the run directory (``start``, with a note when a stale claim was
    taken over) or say who holds it (``held``, the one-line error)."""
    from sandbox.rundir.claims import Claim, ClaimKeeper, acquire, claim_path
    from sandbox.rundir.decisions import Decision
    from sandbox.rundir.directory import unwritable

    mine = Claim.new(timeout_s)
    try:
        attempt = acquire(claim_path(run_path), mine)
    except OSError as error:  # a read-only place, an output_dir that is a file, a full disk
        raise unwritable(run_path, error) from None
    if not attempt.won:
        holder = attempt.other.describe() if attempt.other is not None else "another process"
        return Decision("held", f"run directory {run_path} is being trained by {holder}; nothing was changed "
                                "(wait for it, or stop that process; --resume continues the run afterwards)"), None
    stale = attempt.other
    note = "" if stale is None else (
        f"took over the stale claim of {stale.holder()} on {run_path}, {stale.staleness()}"
    )
    return Decision("start", note), ClaimKeeper(claim_path(run_path), mine).start()


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def remove_empty(run_path: Path, created: Path | None) -> None:
    """Remove the folders the claim created (up to ``created``) when the run left them empty."""
    if created is None:
        return
    for folder in [run_path, *run_path.parents]:
        try:
            os.rmdir(folder)
        except OSError:
            return
        if folder == created:
            return


def skipped_note(summary: dict) -> str:
    """``", 4 of 6 updates skipped (non-finite loss)"`` when a run skipped updates, else nothing."""
    skipped = summary.get("skipped_updates", 0)
    return f", {skipped} of {summary['iters']} updates skipped (non-finite loss or fp16 overflow)" if skipped else ""
