"""``sandbox ablate``: train every combination of a grid and seeds, then compare them.

Runs go in this process, one after the other, through the same functions as ``sandbox run``
(``load_resolved_recipe``, ``start_run``, ``Trainer.train``): no re-import of torch and the plugins
per run, errors arrive as exceptions (a ``SandboxError`` keeps its one-line message), and
``accelerate launch ... -m sandbox ablate`` trains each run on every process. Each run builds its
own model, data and optimizer, seeds every RNG, and gets a fresh Accelerate state (so runs may
differ in ``train.mixed_precision``).
"""

from __future__ import annotations

import gc
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer
from rich.console import Console

from sandbox.analysis.compare import compare_runs
from sandbox.analysis.report import print_table
from sandbox.analysis.runs import clear_failure, find_runs, write_failure
from sandbox.cli.common import PluginOption, RecipeArgument, SetOption, load_resolved_recipe
from sandbox.errors import describe_exception

if TYPE_CHECKING:
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


def train_one(recipe: Recipe, registry: Registry, resume: bool) -> dict[str, Any]:
    """Train (or resume) one run exactly as ``sandbox run`` does; return its summary.

    When a failure on another process ends this one (the sweep cannot go on), the main process
    records the run as failed first.
    """
    import torch
    from accelerate.state import AcceleratorState

    from sandbox.train.loop import start_run

    AcceleratorState._reset_state()  # each run may use its own mixed precision
    trainer = start_run(recipe, registry, resume=resume, overwrite=not resume)
    main, run_path = trainer.accelerator.is_main_process, trainer.run_dir.path

    def record_failure(message: str) -> None:
        if main:
            write_failure(run_path, message)

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

    saved = run_dir.recipe_file.read_text() if run_dir.recipe_file.is_file() else ""
    if saved == recipe.to_toml():
        return ""
    return f" (NOTE: trained with a different recipe: {differing_keys(saved, recipe)}; kept; use another --output to retrain)"


def debug_enabled(context: typer.Context) -> bool:
    """Whether ``sandbox --debug`` was given."""
    return bool(context.find_root().params.get("debug"))


def ablate(
    context: typer.Context,
    recipe: Path = RecipeArgument,
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="KEY=V1,V2,...: one axis of the grid (repeatable)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2 (default: the recipe's seed)."),
    set_: Optional[List[str]] = SetOption,
    plugin: Optional[List[str]] = PluginOption,
    output: Optional[Path] = typer.Option(None, "--output", help="Folder of ablations (default: <output_dir>/ablations)."),
) -> None:
    """Train every grid combination x seed into <output>/<recipe name>/<key=value,...>/seed<k>/ and compare.

    Finished runs are skipped, unfinished ones resumed; a failing run is recorded and the sweep goes on (exit 1),
    unless it failed on some processes only: then the sweep ends on every process (exit 2).
    """
    from accelerate import PartialState

    from sandbox.analysis.sweep import applicable_combinations, parse_grid, parse_seeds, plan
    from sandbox.plugins import load_registry
    from sandbox.recipe import load_recipe
    from sandbox.train.failures import ProcessGroupLost
    from sandbox.train.rundir import RunDirectory

    overrides, plugins = list(set_ or []), list(plugin or [])
    axes = [parse_grid(text) for text in grid or []]
    base = load_recipe(recipe, overrides)
    seed_list = parse_seeds(seeds) if seeds is not None else [base.seed]
    registry = load_registry([*base.plugins, *plugins])
    combinations, notes = applicable_combinations(recipe, overrides, axes, registry)
    folder = ablation_folder(base, output)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    for note in notes:
        console.print(f"note: {note}")
    jobs = [(combination, seed) for combination in combinations for seed in seed_list]
    console.print(f"ablation: {len(combinations)} combinations x {len(seed_list)} seeds = {len(jobs)} runs in {folder}")
    failures = 0
    for index, (combination, seed) in enumerate(jobs, start=1):
        prefix = f"[{index}/{len(jobs)}] {combination.label} seed{seed}"
        run_dir = RunDirectory(folder / combination.label / f"seed{seed}")
        start = time.perf_counter()
        try:
            resolved, run_registry = combination_recipe(recipe, overrides, plugins, combination, seed, folder)
            action = plan(run_dir)
            if action == "skip":
                console.print(f"{prefix}: finished already, skipped{stale_note(run_dir, resolved)}")
                continue
            checkpoint = run_dir.latest_checkpoint()
            console.print(f"{prefix}: {'resuming from ' + checkpoint.name if action == 'resume' and checkpoint else 'training'}")
            clear_failure(run_dir.path)
            summary = train_one(resolved, run_registry, resume=action == "resume")
        except Exception as error:  # recorded; the sweep goes on (KeyboardInterrupt stops it)
            if debug_enabled(context):
                traceback.print_exc()
            if PartialState().is_main_process:  # every process has the same error (agreed_errors)
                write_failure(run_dir.path, describe_exception(error))
            failures += 1
            console.print(f"{prefix}: FAILED: {describe_exception(error)}")
            if isinstance(error, ProcessGroupLost):  # a peer process has ended: no further run can train
                raise
            continue
        console.print(
            f"{prefix}: done, best mIoU {100 * summary['best_miou']:.2f}, final mIoU {100 * summary['final_miou']:.2f} "
            f"({time.perf_counter() - start:.0f} s)"
        )
    if folder.exists():
        print_table(compare_runs(find_runs([folder])))
    if failures:
        console.print(f"{failures} of {len(jobs)} runs failed")
        raise typer.Exit(1)
