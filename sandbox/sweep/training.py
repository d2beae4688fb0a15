"""Train one run of a sweep, record its failure, and say when a finished run is stale.

A run trains exactly as ``sandbox run`` trains it (``load_run_recipe``, ``start_run``,
``Trainer.train``), in this process, with a fresh Accelerate state; torch and the training loop
are imported when a run trains, not when this module is imported (``sandbox ablate --list``).
A failing run gets a ``FAILED`` marker (:func:`mark_failed`), written only by a process whose
claim on the run still holds (:func:`may_write`).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console

from sandbox.rundir.files import write_failure
from sandbox.errors import SandboxError
from sandbox.rundir.files import FAILED_MARKER

if TYPE_CHECKING:
    from sandbox.recipe import Recipe
    from sandbox.registry import Registry
    from sandbox.rundir.claims import ClaimKeeper
    from sandbox.sweep.grid import Combination
    from sandbox.rundir.directory import RunDirectory


def combination_recipe(
    path: Path, overrides: list[str], plugins: list[str], combination: Combination, seed: int, folder: Path
) -> tuple[Recipe, Registry]:
    """The resolved recipe of one run of the sweep (named by its label, inside ``folder``)."""
    from sandbox.plugins import load_run_recipe  # torch: not for the sweep's listing

    resolved, registry = load_run_recipe(path, [*overrides, *combination.overrides, f"seed={seed}"], plugins)
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

    from sandbox.processes.launch import process_state
    from sandbox.train.loop import start_run
    from sandbox.rundir.directory import RunDirectory

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
    from sandbox.recipe import recipe_difference

    saved = run_dir.recipe_file.read_text() if run_dir.recipe_file.is_file() else ""
    difference = recipe_difference(saved, recipe)
    return f" (NOTE: trained with a different recipe: {difference}; kept; use another --output to retrain)" if difference else ""


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
