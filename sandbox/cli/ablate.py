"""``sandbox ablate``: train every combination of a grid and seeds, then compare them.

Runs go in this process, one after the other, through the same functions as ``sandbox run``
(``load_resolved_recipe``, ``start_run``, ``Trainer.train``): no re-import of torch and the plugins
per run, errors arrive as exceptions (a ``SandboxError`` keeps its one-line message), and
``accelerate launch ... -m sandbox ablate`` trains each run on every process. Each run builds its
own model, data and optimizer, seeds every RNG, and gets a fresh Accelerate state (so runs may
differ in ``train.mixed_precision``).

Several jobs may share one sweep folder (``--shard K/N``: a deterministic share of the runs, see
:mod:`sandbox.analysis.shards`). Before training a run, the main process of a job claims it
(:mod:`sandbox.analysis.claims`) and tells its other processes what to do (one broadcast per run),
so every process of the job skips or trains the same runs; a run claimed by another live process
is left to it; every write into the run is fenced by the claim (a holder that lost it stops, see
:meth:`sandbox.analysis.claims.ClaimKeeper.check`). ``--list`` prints every run's state (:mod:`sandbox.analysis.sweep_status`).
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Literal, Optional

import typer
from rich.console import Console

from sandbox.analysis.claims import CLAIM_TIMEOUT_S, TIMEOUT_ENV
from sandbox.analysis.compare import compare_runs
from sandbox.analysis.report import percent, print_table
from sandbox.analysis.runs import clear_failure, find_runs, write_failure
from sandbox.cli.common import PluginOption, RecipeArgument, SetOption, load_resolved_recipe
from sandbox.errors import SandboxError, describe_exception, shared_error
from sandbox.renamed_values import with_current_names
from sandbox.run_files import FAILED_MARKER, SUMMARY_FILE

if TYPE_CHECKING:
    from accelerate import PartialState

    from sandbox.analysis.claims import ClaimKeeper
    from sandbox.analysis.shards import Shard
    from sandbox.analysis.sweep import Combination
    from sandbox.recipe import Recipe
    from sandbox.registry import Registry
    from sandbox.train.rundir import RunDirectory

ABLATIONS_FOLDER = "ablations"
"""Default home of sweeps, inside the recipe's ``output_dir``."""


def ablation_folder(recipe: Recipe, output: Path | None) -> Path:
    """``<output or output_dir/ablations>/<recipe name>``."""
    return (output or Path(recipe.output_dir) / ABLATIONS_FOLDER) / recipe.name


def combination_recipe(
    path: Path, overrides: list[str], plugins: list[str], combination: Combination, seed: int, folder: Path
) -> tuple[Recipe, Registry]:
    """The resolved recipe of one run of the sweep (named by its label, inside ``folder``)."""
    resolved, registry = load_resolved_recipe(path, [*overrides, *combination.overrides, f"seed={seed}"], plugins)
    resolved.name = combination.label
    resolved.output_dir = str(folder)
    return resolved, registry


def train_one(
    recipe: Recipe, registry: Registry, resume: bool, release: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Train (or resume) one run exactly as ``sandbox run`` does; return its summary.

    When a failure on another process ends this one (the sweep cannot go on), the main process
    records the run as failed first, then calls ``release`` (it gives the run's claim back).
    """
    import torch
    from accelerate.state import AcceleratorState

    from sandbox.train.accelerator import process_state
    from sandbox.train.loop import start_run
    from sandbox.train.rundir import RunDirectory

    AcceleratorState._reset_state()  # each run may use its own mixed precision
    main, run_path = process_state().is_main_process, RunDirectory.for_recipe(recipe).path

    def record_failure(message: str) -> None:
        if main:
            write_failure(run_path, message)
            if release is not None:
                release()

    trainer = start_run(recipe, registry, resume=resume, overwrite=not resume, on_stop=record_failure)
    try:
        return trainer.train(resume=resume, on_stop=record_failure)
    finally:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def stale_note(run_dir: RunDirectory, recipe: Recipe) -> str:
    """A warning when a finished run was trained with another recipe than the sweep asks for now."""
    from sandbox.train.rundir import differing_keys

    saved = with_current_names(run_dir.recipe_file.read_text()) if run_dir.recipe_file.is_file() else ""
    if saved and saved == recipe.as_saved_in(saved):
        return ""
    return f" (NOTE: trained with a different recipe: {differing_keys(saved, recipe)}; kept; use another --output to retrain)"


def debug_enabled(context: typer.Context) -> bool:
    """Whether ``sandbox --debug`` was given."""
    return bool(context.find_root().params.get("debug"))


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
    run_dir: RunDirectory, timeout_s: float, shard: Shard | None, failed_before: tuple[int, int] | None
) -> tuple[Decision, ClaimKeeper | None]:
    """On the main process: decide what to do with a run; when it is to be trained, claim it first.

    A finished run is skipped; a run claimed by a live process is ``held``; a run that failed in
    another job since this one started (its ``FAILED`` marker is not ``failed_before``) is left
    alone, so that concurrent jobs try each run once (rerun the sweep to retry it). Otherwise the
    claim is returned, refreshing, with ``start`` or ``resume``.
    """
    from sandbox.analysis.claims import Claim, ClaimKeeper, acquire, claim_path
    from sandbox.analysis.sweep import plan

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


def agree_on(
    state: PartialState, decide: Callable[[], tuple[Decision, ClaimKeeper | None]]
) -> tuple[Decision, ClaimKeeper | None]:
    """The main process runs ``decide``; every process of the job gets its decision (a broadcast).

    An error while deciding (the shared folder unwritable) becomes an ``error`` decision on every
    process, so that all of them go on in step. The claim keeper exists on the main process only.
    """
    from accelerate.utils import broadcast_object_list

    decision: Decision | None = None
    keeper = None
    if state.is_main_process:
        try:
            decision, keeper = decide()
        except Exception as error:  # noqa: BLE001 - every process reports it below
            decision = Decision("error", describe_exception(error))
    if state.num_processes > 1:
        try:
            decision = broadcast_object_list([decision])[0]
        except BaseException:
            if keeper is not None:
                keeper.release()
            raise
    assert decision is not None
    return decision, keeper


def finished_note(
    run_dir: RunDirectory, path: Path, overrides: list[str], plugins: list[str], combination: Combination, seed: int,
    folder: Path,
) -> str:
    """:func:`stale_note` for a finished run; nothing when the sweep's recipe for it cannot be resolved."""
    try:
        resolved, _ = combination_recipe(path, overrides, plugins, combination, seed, folder)
    except Exception:  # noqa: BLE001 - the run is finished: nothing to report about it
        return ""
    return stale_note(run_dir, resolved)


def ablate(
    context: typer.Context,
    recipe: Path = RecipeArgument,
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="KEY=V1,V2,...: one axis of the grid (repeatable)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2 (default: the recipe's seed)."),
    set_: Optional[List[str]] = SetOption,
    plugin: Optional[List[str]] = PluginOption,
    output: Optional[Path] = typer.Option(None, "--output", help="Folder of ablations (default: <output_dir>/ablations)."),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="K/N: train only share K (0..N-1) of N jobs: run i of the sweep belongs to shard i mod N."
    ),
    list_: bool = typer.Option(False, "--list", help="Print every run of the sweep with its state; train nothing."),
    claim_timeout: float = typer.Option(
        CLAIM_TIMEOUT_S, "--claim-timeout", envvar=TIMEOUT_ENV, show_default=True,
        help="Seconds without a refresh after which this job's claims count as stale (refreshed every tenth).",
    ),
) -> None:
    """Train every grid combination x seed into <output>/<recipe name>/<key=value,...>/seed<k>/ and compare.

    Finished runs are skipped, unfinished ones resumed; a run claimed by another live process (another
    shard, a duplicate job) is left to it. A failing run is recorded and the sweep goes on (exit 1),
    unless it failed on some processes only: then the sweep ends on every process (exit 2).
    """
    from sandbox.analysis.shards import Shard, parse_shard

    chosen = parse_shard(shard) if shard is not None else None
    if not claim_timeout > 0:
        raise SandboxError(f"--claim-timeout {claim_timeout:g}: expected a positive number of seconds")

    from sandbox.analysis.sweep import applicable_combinations, parse_grid, parse_seeds
    from sandbox.plugins import load_registry
    from sandbox.recipe import load_recipe

    overrides, plugins = list(set_ or []), list(plugin or [])
    axes = [parse_grid(text) for text in grid or []]
    base = load_recipe(recipe, overrides)
    seed_list = parse_seeds(seeds) if seeds is not None else [base.seed]
    registry = load_registry([*base.plugins, *plugins])
    combinations, notes = applicable_combinations(recipe, overrides, axes, registry)
    folder = ablation_folder(base, output)
    console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)  # [perturbation] as written
    for note in notes:
        console.print(f"note: {note}")
    jobs = [(combination, seed) for combination in combinations for seed in seed_list]
    console.print(f"ablation: {len(combinations)} combinations x {len(seed_list)} seeds = {len(jobs)} runs in {folder}")
    if list_:
        from sandbox.analysis.sweep_status import RunStatus, print_status, run_state

        statuses = []
        for position, (combination, seed) in enumerate(jobs):
            path = folder / combination.label / f"seed{seed}"
            statuses.append(RunStatus(position, combination.label, seed, path, *run_state(path)))
        print_status(statuses, chosen.count if chosen is not None else None)
        return
    share = (chosen or Shard()).share(jobs)
    if chosen is not None:
        console.print(f"shard {chosen}: {len(share)} of these runs (run i of the sweep belongs to shard i mod {chosen.count})")
    tally = sweep(context, share, recipe, overrides, plugins, folder, chosen, claim_timeout, console)
    report_end(tally, chosen, [folder / c.label / f"seed{s}" for c, s in jobs], folder, console)
    if tally.failed:
        console.print(f"{tally.failed} of {len(share)} runs failed")
        raise typer.Exit(1)


def report_end(tally: Tally, shard: Shard | None, run_paths: list[Path], folder: Path, console: Console) -> None:
    """What this job left to others; the ``compare`` table of the folder (of a shard: once every run is finished)."""
    scope = "the sweep" if shard is None else f"shard {shard}"
    if tally.trained + tally.failed == 0:
        elsewhere = f", {tally.failed_elsewhere} failed in another job" if tally.failed_elsewhere else ""
        console.print(f"{scope}: nothing left to do ({tally.finished} finished, {tally.held} being trained by other "
                      f"processes{elsewhere})")
    elif tally.held == 1:
        console.print("1 run was being trained by another process: left to it")
    elif tally.held:
        console.print(f"{tally.held} runs were being trained by other processes: left to them")
    finished = sum((path / SUMMARY_FILE).is_file() for path in run_paths)
    if shard is None or finished == len(run_paths):
        if folder.exists():
            print_table(compare_runs(find_runs([folder])))
    else:
        console.print(f"{finished} of {len(run_paths)} runs of the sweep are finished (--list shows every run); "
                      f"once all are: sandbox compare {folder}")


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


def sweep(
    context: typer.Context,
    share: list[tuple[int, tuple[Combination, int]]],
    path: Path,
    overrides: list[str],
    plugins: list[str],
    folder: Path,
    shard: Shard | None,
    claim_timeout: float,
    console: Console,
) -> Tally:
    """Train the runs of ``share`` not finished nor held by another process, one after another, on every process."""
    from sandbox.analysis.claims import released_on_sigterm
    from sandbox.train.accelerator import process_state
    from sandbox.train.failures import ProcessGroupLost
    from sandbox.train.rundir import RunDirectory, guarded_writes

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
                with guarded_writes(run_dir.path, keeper.check if keeper is not None else None):  # the claim's fence
                    summary = train_one(resolved, run_registry, resume=resume, release=keeper.release if keeper else None)
            except Exception as error:  # recorded; the sweep goes on (KeyboardInterrupt stops it)
                if debug_enabled(context):
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


def may_write(keeper: ClaimKeeper | None) -> bool:
    """Whether this process may still write into the run: its claim was not lost (None: not claimed here)."""
    if keeper is None:
        return True
    try:
        keeper.check()
    except SandboxError:  # taken over: the run is another process's now
        return False
    return True


def mark_failed(run_path: Path, message: str, console: Console) -> None:
    """Write the run's ``FAILED`` marker; a folder that cannot be written gets a warning instead."""
    try:
        write_failure(run_path, message)
    except OSError as error:
        console.print(f"warning: {run_path / FAILED_MARKER} cannot be written: {error.strerror or error}")
