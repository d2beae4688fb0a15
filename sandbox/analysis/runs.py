"""Run directories on disk: find them under folders and read their recipe, summary and state.

A run directory is a folder holding ``recipe.toml`` (written when a run starts) or ``FAILED``
(written by ``sandbox ablate`` when a run raised, possibly before its recipe could be written).
A run is *finished* once ``summary.json`` exists, *failed* when it holds ``FAILED`` or an
unreadable file, and *unfinished* otherwise (still training, interrupted, or killed).

This module imports nothing heavy (no torch, no pydantic), so ``sandbox compare`` starts at once:
the run files' names come from :mod:`sandbox.rundir.files`.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from sandbox.errors import SandboxError
from sandbox.renamed_values import rename_old_values
from sandbox.rundir.files import FAILED_MARKER, METRICS_FILE, RECIPE_FILE, SUMMARY_FILE, flatten_keys, read_json_object


Status = Literal["finished", "unfinished", "failed"]
"""The state of a run directory (see the module docstring)."""


@dataclass
class RunRecord:
    """One run directory: its flattened recipe, its summary and why it is not usable, if so."""

    path: Path
    recipe: dict[str, Any] | None
    """The flattened ``recipe.toml``; None when it is missing or unreadable."""
    summary: dict[str, Any] | None
    """``summary.json``; None until the run finishes."""
    failure: str | None = None
    """The error that stopped the run, or why its files cannot be read."""

    @property
    def status(self) -> Status:
        """``finished``, ``failed`` or ``unfinished`` (see the module docstring)."""
        if self.failure is not None:
            return "failed"
        return "finished" if self.summary is not None else "unfinished"

    @property
    def seed(self) -> int | None:
        """The run's seed, from its recipe (or its summary)."""
        if self.recipe is not None and "seed" in self.recipe:
            return self.recipe["seed"]
        return (self.summary or {}).get("seed")

    def detail(self) -> str:
        """Why the run is not in a comparison: the failure, or how far an unfinished run got."""
        if self.failure is not None:
            return self.failure
        step = last_logged_step(self.path)
        total = (self.recipe or {}).get("train.iters")
        reached = "no step logged" if step is None else f"last logged step {step}"
        return f"{reached} of {total}" if total is not None else reached


def last_logged_step(path: Path) -> int | None:
    """The ``step`` of the last record of ``metrics.jsonl`` in ``path``, or None."""
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        return None
    for line in reversed(metrics.read_text().splitlines()):
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(step, int):
            return step
    return None


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds ``recipe.toml`` or a ``FAILED`` marker."""
    return (path / RECIPE_FILE).is_file() or (path / FAILED_MARKER).is_file()


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Run directories given directly or found anywhere below the given folders, sorted, once each.

    A file argument stands for its folder (``runs/x/seed0/summary.json`` is that run). A path
    that does not exist, or a folder without any run, is an error naming it.
    """
    found: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise SandboxError(f"{path} does not exist (expected a run directory or a folder of runs)")
        folder = path.parent if path.is_file() else path
        if is_run_dir(folder):
            found.add(folder)
            continue
        below = {marker.parent for name in (RECIPE_FILE, FAILED_MARKER) for marker in folder.rglob(name)}
        if not below:
            raise SandboxError(f"{path} holds no run directory (no {RECIPE_FILE} in it or below it)")
        found |= below
    return sorted(found)


def read_run(path: Path) -> RunRecord:
    """Read one run directory (never raises for bad files: they make the run *failed*)."""
    recipe: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    failure: str | None = None
    if (path / RECIPE_FILE).is_file():
        try:
            saved = tomllib.loads((path / RECIPE_FILE).read_text())
            rename_old_values(saved)  # runs saved before a rename group with those saved after it
            recipe = flatten_keys(saved)
        except (OSError, tomllib.TOMLDecodeError) as error:
            failure = f"{RECIPE_FILE} could not be read: {error}"
    if (path / SUMMARY_FILE).is_file():
        summary, problem = read_json_object(path / SUMMARY_FILE)
        failure = failure or problem
    elif (path / FAILED_MARKER).is_file():
        failure = (path / FAILED_MARKER).read_text().strip() or "failed (no message recorded)"
    return RunRecord(path, recipe, summary, failure)


def find_runs(paths: Iterable[Path]) -> list[RunRecord]:
    """Every run directory given or found below ``paths`` (see :func:`find_run_dirs`), read."""
    return [read_run(path) for path in find_run_dirs(paths)]
