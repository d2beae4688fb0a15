"""``sandbox ablate``: train every combination of a grid and seeds, then compare them.

This module parses the options and prints; the sweep itself lives in :mod:`sandbox.sweep`:
:mod:`~sandbox.sweep.grid` expands the grid, :mod:`~sandbox.sweep.shards` splits it between jobs,
:mod:`~sandbox.sweep.execute` trains the runs (:mod:`~sandbox.rundir.decisions`,
:mod:`~sandbox.rundir.claims`, :mod:`~sandbox.sweep.training`) and :mod:`~sandbox.sweep.status`
reads each run's state for ``--list``.

Runs go in this process, one after the other, through the same functions as ``sandbox run``
(``load_resolved_recipe``, ``start_run``, ``Trainer.train``): no re-import of torch and the plugins
per run, errors arrive as exceptions (a ``SandboxError`` keeps its one-line message), and
``accelerate launch ... -m sandbox ablate`` trains each run on every process. Each run builds its
own model, data and optimizer, seeds every RNG, and gets a fresh Accelerate state (so runs may
differ in ``train.mixed_precision``).

Several jobs may share one sweep folder (``--shard K/N``: a deterministic share of the runs, see
:mod:`sandbox.sweep.shards`). Before training a run, the main process of a job claims it
(:mod:`sandbox.rundir.claims`) and tells its other processes what to do (one agreement per run),
so every process of the job skips or trains the same runs; a run claimed by another live process
is left to it; every write into the run is fenced by the claim (a holder that lost it stops, see
:meth:`sandbox.rundir.claims.ClaimKeeper.check`). ``--list`` prints every run's state (:mod:`sandbox.sweep.status`);
it imports no torch unless the grid sets a plugin option (checking it needs the plugin registry).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

import typer
from rich.console import Console

from sandbox.analysis.compare import compare_runs
from sandbox.analysis.report import print_table
from sandbox.analysis.runs import find_runs
from sandbox.cli.common import PluginOption, RecipeArgument, SetOption
from sandbox.errors import SandboxError
from sandbox.rundir.files import SUMMARY_FILE
from sandbox.rundir.claims import CLAIM_TIMEOUT_S, TIMEOUT_ENV

if TYPE_CHECKING:
    from sandbox.registry import Registry
    from sandbox.sweep.execute import Tally
    from sandbox.sweep.shards import Shard


def debug_enabled(context: typer.Context) -> bool:
    """Whether ``sandbox --debug`` was given."""
    return bool(context.find_root().params.get("debug"))


def registry_loader(plugins: list[str]) -> Callable[[], Registry]:
    """A function loading the plugin registry (with ``plugins``) on its first call, the same one after."""

    @cache
    def load() -> Registry:
        from sandbox.plugins import load_registry

        return load_registry(plugins)

    return load


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
    list_: bool = typer.Option(
        False, "--list", help="Print every run of the sweep with its state and size on disk; train nothing."
    ),
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
    from sandbox.sweep.shards import Shard, parse_shard

    chosen = parse_shard(shard) if shard is not None else None
    if not claim_timeout > 0:
        raise SandboxError(f"--claim-timeout {claim_timeout:g}: expected a positive number of seconds")

    from sandbox.recipe import load_recipe
    from sandbox.sweep.grid import (
        ablation_folder, applicable_combinations, check_run_folder_names, parse_grid, parse_seeds, set_by_the_grid,
    )

    overrides, plugins = list(set_ or []), list(plugin or [])
    axes = [parse_grid(text) for text in grid or []]
    set_by_the_grid(overrides, axes)
    base = load_recipe(recipe, overrides)
    seed_list = parse_seeds(seeds) if seeds is not None else [base.seed]
    registry = registry_loader([*base.plugins, *plugins])
    if not list_:
        registry()  # a plugin that fails to load is an error before any run; --list loads it only if the grid needs it
        from sandbox.train.accelerator import check_trackers

        check_trackers(base.train.trackers)  # a missing tracker package: one line before any run, not a FAILED each
    combinations, notes = applicable_combinations(recipe, overrides, axes, registry)
    folder = ablation_folder(base, output)
    check_run_folder_names(combinations, folder)
    console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)  # [perturbation] as written
    for note in notes:
        console.print(f"note: {note}")
    jobs = [(combination, seed) for combination in combinations for seed in seed_list]
    console.print(f"ablation: {len(combinations)} combinations x {len(seed_list)} seeds = {len(jobs)} runs in {folder}")
    if list_:
        from sandbox.sweep.status import print_status, sweep_statuses

        print_status(sweep_statuses(jobs, folder), chosen.count if chosen is not None else None, folder=folder)
        return
    share = (chosen or Shard()).share(jobs)
    if chosen is not None:
        console.print(f"shard {chosen}: {len(share)} of these runs (run i of the sweep belongs to shard i mod {chosen.count})")
    from sandbox.sweep.execute import run_sweep

    tally = run_sweep(share, recipe, overrides, plugins, folder, chosen, claim_timeout, console, debug_enabled(context))
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
