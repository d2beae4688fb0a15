"""Training curves: every numeric value of ``metrics.jsonl``, one PNG per value, runs overlaid.

Scalar values (``loss``, ``lr``, ``val_miou``, ``density_nll``, ...) become one curve each;
dict values become one curve per entry (``val_per_class_iou.disc``). Figures are drawn with
matplotlib's Agg canvas (no display, no global pyplot state) at a fixed pixel size.
"""

from __future__ import annotations

import json
import math
import os
import hashlib
import re
from pathlib import Path
from typing import Any, Callable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sandbox.rundir.files import METRICS_FILE

FIGURE_INCHES = (6.4, 4.0)
"""Width and height of a curve figure."""

DPI = 100
"""Pixels per inch of every PNG (a curve figure is 640 x 400 pixels)."""

MARKER_MAX_POINTS = 50
"""Curves with at most this many points mark each point (evaluations are sparse)."""

UNSAFE_FILE_CHARS = re.compile(r"[^\w.=,+-]")
"""Characters of a name replaced by ``_`` in its file name (letters of any script are kept)."""


def file_names(names: list[str]) -> list[str]:
    """A distinct file name (no extension) for each of the distinct ``names``: the name with unsafe
    characters replaced by ``_``, plus a short hash of the name where two would otherwise clash."""
    safe = [UNSAFE_FILE_CHARS.sub("_", name) for name in names]
    return [
        f"{base}-{hashlib.sha1(name.encode()).hexdigest()[:8]}" if safe.count(base) > 1 else base
        for name, base in zip(names, safe)
    ]

Series = dict[str, tuple[list[int], list[float]]]
"""Value name -> (steps, values)."""


def read_metrics(run_dir: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (none if it is missing). A line that is no JSON object
    with an integer ``step`` (cut short by a kill, garbled) is skipped, and ``warn`` gets one line naming
    the file and the line's number."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif warn is not None:
            shown = line if len(line) <= 40 else line[:40] + "..."
            warn(f"{path}:{number}: skipped a line that is not a metrics record (cut short by a kill?): {shown}")
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def series(records: list[dict[str, Any]]) -> Series:
    """Every numeric value of the records against its step, in order of first appearance."""
    curves: Series = {}
    for record in records:
        for key, value in record.items():
            entries = value.items() if isinstance(value, dict) else [("", value)]
            for sub, item in entries:
                number = _number(item)
                if key == "step" or number is None:
                    continue
                steps, values = curves.setdefault(f"{key}.{sub}" if sub else key, ([], []))
                steps.append(record["step"])
                values.append(number)
    return curves


def run_labels(paths: list[Path]) -> list[str]:
    """Short names for runs: paths relative to their common folder (``name/seed0`` for one run)."""
    if len(paths) == 1:
        return [str(Path(paths[0].parent.name) / paths[0].name)]
    common = Path(os.path.commonpath([path.resolve() for path in paths]))
    return [str(path.resolve().relative_to(common)) for path in paths]


def plot_metric(name: str, curves: dict[str, tuple[list[int], list[float]]], path: Path) -> Path:
    """One figure of value ``name``: a line per run (``label -> (steps, values)``), saved as PNG."""
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (steps, values) in curves.items():
        axes.plot(steps, values, marker="." if len(steps) <= MARKER_MAX_POINTS else None, label=label)
    axes.set_title(name)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    if curves:  # one run too: the legend names the run the curve belongs to
        axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def plot_curves(runs: dict[str, Series], out_dir: Path) -> list[Path]:
    """A PNG per value in ``out_dir`` (``<value>.png``), overlaying the runs (``label -> series``)."""
    names = list(dict.fromkeys(name for curves in runs.values() for name in curves))
    written = []
    for name, file_name in zip(names, file_names(names)):
        curves = {label: run[name] for label, run in runs.items() if name in run}
        written.append(plot_metric(name, curves, out_dir / f"{file_name}.png"))
    return written
