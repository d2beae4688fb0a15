"""``sandbox compare``: group runs by the recipe keys that differ and tabulate mIoU over seeds.

This command imports no torch, accelerate or matplotlib: it only reads the files of run directories.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from sandbox.analysis.compare import Comparison, compare_runs
from sandbox.analysis.report import FORMATS, HUMAN_FORMATS, RENDERERS, excluded_lines, print_notes, print_table
from sandbox.analysis.runs import RunRecord, find_runs
from sandbox.disk import folder_bytes, human_bytes


class Metric(str, Enum):
    """The summary value to compare."""

    best_miou = "best_miou"
    final_miou = "final_miou"


Format = Enum("Format", {name: name for name in FORMATS}, type=str)
"""Output formats (``report.FORMATS``)."""


BaselineOption = typer.Option(
    None,
    "--baseline",
    help="The reference group: KEY=VALUE of a differing key (repeatable; all must match). "
    "Default: perturbation.name=none if present, else the first group.",
)
MetricOption = typer.Option(
    Metric.best_miou, "--metric", help="Summary value to compare (the other one is shown beside it when the runs have it)."
)
FormatOption = typer.Option(
    Format.table, "--format", help=f"table (rich), {', '.join(FORMATS[1:-1])} or {FORMATS[-1]}."
)
ColumnsOption = typer.Option(
    None, "--columns", help="KEY,KEY,...: show only these differing keys (they must still tell the groups apart)."
)


def emit(comparison: Comparison, output: str) -> None:
    """Print ``comparison`` in ``output`` format; machine formats send the left-out runs to stderr.

    A seed that ran more than once in a group gets a ``note:`` line on stderr in every format, and
    differing keys that ``--columns`` hides a ``warning:`` line.
    """
    if output == Format.table.value:
        print_table(comparison)
        return
    print_notes(comparison)
    sys.stdout.write(RENDERERS[output](comparison))
    sys.stdout.flush()
    if output not in HUMAN_FORMATS:
        for line in excluded_lines(comparison):
            print(line, file=sys.stderr)


def disk_line(runs: list[RunRecord]) -> str:
    """``disk: N run folders hold SIZE`` (every file below each run directory: weights, checkpoints, logs)."""
    size = sum(folder_bytes(run.path) for run in runs)
    return f"disk: {len(runs)} run folder{'s' * (len(runs) != 1)} hold{'s' * (len(runs) == 1)} {human_bytes(size)}"


def compare(
    runs: List[Path] = typer.Argument(..., help="Run directories or folders holding runs (searched recursively).", show_default=False),
    baseline: Optional[List[str]] = BaselineOption,
    metric: Metric = MetricOption,
    output: Format = FormatOption,
    columns: Optional[str] = ColumnsOption,
) -> None:
    """Group runs by the recipe keys that differ; mean ± std over seeds, n, Δ vs a baseline, paired Δ by seed with a 95% CI.

    A seed counts once per group: of runs repeating it, the one whose path sorts first is kept (a note says which).
    The other of best_miou/final_miou is shown next to --metric; the paired Δ uses only the seeds both groups ran.
    A warning says when the runs are on different datasets; the table ends with how much the runs' folders hold on disk.
    """
    shown = [key.strip() for key in columns.split(",") if key.strip()] if columns else None
    records = find_runs(runs)
    comparison = compare_runs(records, metric.value, list(baseline or []), shown)
    emit(comparison, output.value)
    if output is Format.table:  # the interactive view; the others are pasted or parsed as they are
        print(disk_line(records), flush=True)
