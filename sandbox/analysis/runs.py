"""Run directories on disk: find them under folders and read their recipe, summary and state.

A run directory is a folder holding ``recipe.toml`` (written when a run starts) or ``FAILED``
(written by ``sandbox ablate`` when a run raised, possibly before its recipe could be written).
A run is *finished* once ``summary.json`` exists, *failed* when it holds ``FAILED`` or an
unreadable file, and *unfinished* otherwise (still training, interrupted, or killed).

This module imports nothing heavy (no torch, no pydantic), so ``sandbox compare`` starts at once:
the run files' names come from :mod:`sandbox.run_files`.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from sandbox.errors import SandboxError
from sandbox.renamed_values import rename_old_values
from sandbox.run_files import FAILED_MARKER, METRICS_FILE, PROVENANCE_FILE, RECIPE_FILE, SUMMARY_FILE, flatten_keys


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


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) inside it replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def strict_json(value: Any, indent: int | None = None) -> str:
    """``value`` as strict JSON (RFC 8259, which strict parsers such as ``jq`` and JavaScript's
    ``JSON.parse`` require): a non-finite float (NaN, inf) is written as ``null``, never as ``NaN``
    or ``Infinity``. Every JSON file and document the project writes goes through it; readers take
    ``null`` as "no value"."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object and None, or None and why it could not be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return None, f"{path.name} could not be read: {error}"
    if not isinstance(data, dict):
        return None, f"{path.name} holds no JSON object"
    return data, None


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
        summary, problem = _read_json(path / SUMMARY_FILE)
        failure = failure or problem
    elif (path / FAILED_MARKER).is_file():
        failure = (path / FAILED_MARKER).read_text().strip() or "failed (no message recorded)"
    return RunRecord(path, recipe, summary, failure)


def read_provenance(path: Path) -> dict[str, dict[str, Any]] | None:
    """The components recorded in ``provenance.json`` of the run directory ``path``, by recipe table
    (``{"perturbation": {"kind": ..., "name": ..., "source": ..., ...}}``); None when the run has no
    readable record (started before runs recorded it, or damaged)."""
    data, problem = _read_json(path / PROVENANCE_FILE) if (path / PROVENANCE_FILE).is_file() else (None, "missing")
    components = (data or {}).get("components")
    if problem is not None or not isinstance(components, dict):
        return None
    return {table: entry for table, entry in components.items() if isinstance(entry, dict)}


def find_runs(paths: Iterable[Path]) -> list[RunRecord]:
    """Every run directory given or found below ``paths`` (see :func:`find_run_dirs`), read."""
    return [read_run(path) for path in find_run_dirs(paths)]


def write_failure(path: Path, message: str) -> None:
    """Mark ``path`` as a failed run with the one-line ``message``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / FAILED_MARKER).write_text(message.strip() + "\n")


def clear_failure(path: Path) -> None:
    """Remove a ``FAILED`` marker before the run is tried again."""
    (path / FAILED_MARKER).unlink(missing_ok=True)
