"""The state of every run of a sweep, read from its folder alone (``sandbox ablate --list``).

States, the first that applies: ``done`` (``summary.json``), ``running`` (a fresh claim),
``stale claim`` (a claim whose holder stopped refreshing it: the next job takes it over),
``failed`` (``FAILED``), ``partial`` (trained part of the way; it resumes from its last complete
checkpoint, or starts afresh without one), ``to do``. Each run's size on disk, and the folder's
(:mod:`sandbox.disk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sandbox.analysis.runs import read_run
from sandbox.disk import folder_bytes, human_bytes
from sandbox.rundir.files import METRICS_FILE, RECIPE_FILE
from sandbox.rundir.claims import claim_path, read_claim
from sandbox.sweep.shards import shard_of
from sandbox.rundir.directory import RunDirectory

if TYPE_CHECKING:
    from sandbox.sweep.grid import Combination

RunState = Literal["done", "running", "stale claim", "failed", "partial", "to do"]
"""The state of one run of a sweep (see the module docstring)."""

STATES: tuple[RunState, ...] = ("done", "running", "stale claim", "failed", "partial", "to do")
"""Every state, in the order of the summary line."""

STYLES = {"done": "green", "running": "cyan", "stale claim": "yellow", "failed": "red", "partial": "", "to do": "dim"}


@dataclass(frozen=True)
class RunStatus:
    """One run of a sweep: where it is in the sweep's order, its folder and its state."""

    position: int
    label: str
    seed: int
    path: Path
    state: RunState
    detail: str
    size: int = 0
    """Bytes the run's folder holds."""
    checkpoint_size: int = 0
    """Bytes of it in resumable checkpoints (``checkpoints/``)."""


def progress(path: Path) -> str:
    """How far the run got and where it resumes: ``last logged step 4 of 8, resumes from step_00000004``."""
    record = read_run(path)
    checkpoint = RunDirectory(path).latest_checkpoint() if (path / "checkpoints").is_dir() else None
    started = (path / RECIPE_FILE).is_file() or (path / METRICS_FILE).is_file()
    reached = record.detail() if started else "not started"
    if checkpoint is not None:
        return f"{reached}, resumes from {checkpoint.name}"
    return f"{reached}, no complete checkpoint" if started else reached


def run_state(path: Path, now: float | None = None) -> tuple[RunState, str]:
    """The state of the run directory ``path`` and a detail line (``now``: on the clock of the claim's file server)."""
    record = read_run(path)
    if record.summary is not None:
        best = record.summary.get("best_miou")
        return "done", f"best mIoU {100 * best:.2f}" if isinstance(best, (int, float)) else ""
    claim = read_claim(claim_path(path))
    if claim is not None and now is None:
        now = claim.now()  # the file server's clock, as the claim's heartbeat
    if claim is not None and not claim.is_stale(now):
        return "running", f"{claim.describe(now)}; {progress(path)}"
    if claim is not None:
        return "stale claim", f"{claim.holder()} {claim.staleness(now)}: the next job takes it over; {progress(path)}"
    if record.failure is not None:
        return "failed", record.failure
    if path.is_dir() and any(path.iterdir()):
        return "partial", progress(path)
    return "to do", ""


def counts(statuses: list[RunStatus]) -> str:
    """``12 runs: 5 done, 2 running, 1 failed, 4 to do`` (states with no run left out)."""
    parts = [f"{sum(s.state == state for s in statuses)} {state}" for state in STATES]
    return f"{len(statuses)} runs: " + ", ".join(part for part in parts if not part.startswith("0 "))


def disk_line(statuses: list[RunStatus], folder: Path) -> str:
    """``3.4 GB on disk in FOLDER: 2.9 GB in these 12 runs, 2.2 GB of it resumable checkpoints (...)`` (the
    folder may hold runs of other grids too)."""
    total = folder_bytes(folder)
    if not total:
        return f"nothing on disk yet in {folder}"
    listed, checkpoints = sum(s.size for s in statuses), sum(s.checkpoint_size for s in statuses)
    runs = "this run" if len(statuses) == 1 else f"these {len(statuses)} runs"
    line = f"{human_bytes(total)} on disk in {folder}: {human_bytes(listed)} in {runs}"
    if not checkpoints:
        return line
    return (f"{line}, {human_bytes(checkpoints)} of it resumable checkpoints (checkpoints/; "
            "train.keep_checkpoints_when_done = false deletes a run's once it finishes)")


def print_status(
    statuses: list[RunStatus], shard_count: int | None, console: Console | None = None, folder: Path | None = None
) -> None:
    """A table of the runs (with each run's shard of ``shard_count`` when given) and their size on disk,
    then :func:`counts` and, given the sweep's ``folder``, :func:`disk_line`."""
    console = console or Console(highlight=False, soft_wrap=True)
    table = Table(show_edge=True, header_style="bold")
    for title in ("#", "run", "seed", *(["shard"] if shard_count else []), "state", "disk", "detail"):
        table.add_column(title, overflow="fold", justify="right" if title == "disk" else "left")
    for status in statuses:
        shard = [f"{shard_of(status.position, shard_count)}/{shard_count}"] if shard_count else []
        state = Text(status.state, style=STYLES[status.state])
        size = human_bytes(status.size) if status.size else "-"
        table.add_row(str(status.position), Text(status.label), str(status.seed), *shard, state, size, Text(status.detail))
    console.print(table)
    console.print(counts(statuses))
    if folder is not None:
        console.print(disk_line(statuses, folder))


def sweep_statuses(jobs: list[tuple[Combination, int]], folder: Path) -> list[RunStatus]:
    """The state of every run of a sweep (its combinations x seeds, in order) inside ``folder``."""
    statuses = []
    for position, (combination, seed) in enumerate(jobs):
        path = folder / combination.label / f"seed{seed}"
        statuses.append(RunStatus(position, combination.label, seed, path, *run_state(path),
                                  folder_bytes(path), folder_bytes(path / "checkpoints")))
    return statuses
