"""``sandbox run``: train a recipe into its run directory (or resume it)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from sandbox.cli.common import PluginOption, RecipeArgument, SetOption, load_resolved_recipe


def run(
    recipe: Path = RecipeArgument,
    set_: Optional[List[str]] = SetOption,
    plugin: Optional[List[str]] = PluginOption,
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
) -> None:
    """Train, evaluate and checkpoint a recipe; outputs go to <output_dir>/<name>/seed<seed>/."""
    from sandbox.errors import SandboxError
    from sandbox.train.loop import start_run

    if resume and overwrite:
        raise SandboxError("--resume and --overwrite contradict each other: --resume continues the run, "
                           "--overwrite replaces it; give one")
    resolved, registry = load_resolved_recipe(recipe, set_, plugin)
    trainer = start_run(resolved, registry, resume=resume, overwrite=overwrite)
    run_dir = trainer.run_dir
    console = Console(stderr=True)
    if trainer.accelerator.is_main_process:
        console.print(f"run directory: {run_dir.path}", highlight=False, soft_wrap=True)
    summary = trainer.train(resume=resume)
    if trainer.accelerator.is_main_process:
        console.print(
            f"done: final mIoU {100 * summary['final_miou']:.2f}, best mIoU {100 * summary['best_miou']:.2f} "
            f"(step {summary['best_step']}), {summary['wall_time_s']:.0f} s{skipped_note(summary)}; "
            f"run directory: {run_dir.path}",
            highlight=False,
            soft_wrap=True,
        )


def skipped_note(summary: dict) -> str:
    """``", 4 of 6 updates skipped (non-finite loss)"`` when a run skipped updates, else nothing."""
    skipped = summary.get("skipped_updates", 0)
    return f", {skipped} of {summary['iters']} updates skipped (non-finite loss or fp16 overflow)" if skipped else ""
