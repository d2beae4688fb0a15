"""Render a :class:`~sandbox.analysis.compare.Comparison`: rich table, Markdown, CSV, LaTeX, JSON.

Human formats (``table``, ``md``, ``latex``) show the metric in percent with two decimals as
``mean ± std`` (``std`` is ``-`` for a single run), the difference to the baseline in percentage
points, and list unfinished and failed runs below the table (as ``%`` comments in LaTeX).
Machine formats (``csv``, ``json``) hold raw fractions and keep stdout parseable: the runs left
out go to stderr. In every format, a seed that ran more than once in a group counts once, and a
``note:`` line on stderr names the runs (see :func:`duplicate_lines`).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sandbox.analysis.compare import Comparison, Duplicate, Group, format_value

FORMATS = ("table", "md", "csv", "latex", "json")
"""Output formats of ``sandbox compare``."""

HUMAN_FORMATS = ("table", "md", "latex")
"""Formats that list the runs left out below the table (the others write them to stderr)."""


def percent(value: float | None) -> str:
    """A fraction as a percentage with two decimals; ``-`` for None (never scored)."""
    return "-" if value is None else f"{100 * value:.2f}"


def mean_std(group: Group) -> str:
    """``mean ± std`` in percent; ``-`` for the std of a single run."""
    return f"{percent(group.mean)} ± {'-' if group.std is None else percent(group.std)}"


def delta(group: Group) -> str:
    """The difference to the baseline mean in percentage points, signed."""
    return f"{100 * group.delta:+.2f}"


def notes(group: Group, comparison: Comparison) -> str:
    """``best``, ``baseline`` and ``unequal seeds (n of max)`` as they apply."""
    largest = max(other.n for other in comparison.groups)
    marks = ["best"] * group.best + ["baseline"] * group.baseline
    if group.unequal_seeds:
        marks.append(f"unequal seeds ({group.n} of {largest})")
    return ", ".join(marks)


def key_columns(comparison: Comparison) -> list[str]:
    """The differing keys, or a single ``group`` column when every run shares one configuration."""
    return comparison.keys or ["group"]


def key_cells(group: Group) -> list[str]:
    """The group's values of the differing keys (``all runs`` when there are none)."""
    return [format_value(value) for value in group.values.values()] or [group.label()]


def header(comparison: Comparison) -> list[str]:
    """Column titles of the human formats."""
    return [*key_columns(comparison), f"{comparison.metric} (%)", "n", "Δ (pp)", "notes"]


def human_rows(comparison: Comparison) -> list[list[str]]:
    """One row of cells per group, in the order of :func:`header`."""
    return [
        [*key_cells(group), mean_std(group), str(group.n), delta(group), notes(group, comparison)]
        for group in comparison.groups
    ]


def caption(comparison: Comparison) -> str:
    """What the numbers are and which group is the baseline."""
    reference = comparison.baseline
    base = f"; Δ vs baseline {reference.label()}" if reference is not None else ""
    return f"mean ± sample std (ddof=1) over seeds, - for n=1{base}"


def excluded_lines(comparison: Comparison) -> list[str]:
    """``unfinished: PATH (detail)`` / ``failed: PATH: error`` for every run left out."""
    lines = []
    for run in comparison.excluded:
        if run.status == "failed":
            lines.append(f"failed: {run.path}: {run.detail()}")
        else:
            lines.append(f"unfinished: {run.path} ({run.detail()})")
    return lines


def duplicate_line(duplicate: Duplicate) -> str:
    """``note: seed S counted once in group G: kept PATH; left out PATH, ...`` and whether their results differ."""
    left_out = ", ".join(str(run.path) for run in duplicate.dropped)
    line = f"note: seed {format_value(duplicate.seed)} counted once in group {duplicate.group.label()}: kept {duplicate.kept.path}; left out {left_out}"
    differing = duplicate.differing_results()
    if not differing:
        return f"{line} (identical results)"
    values = "; ".join(f"{metric} " + " vs ".join(format_value(value) for value in seen) for metric, seen in differing.items())
    return f"{line}; results differ for the same recipe and seed (not reproducible): {values}"


def duplicate_lines(comparison: Comparison) -> list[str]:
    """One :func:`duplicate_line` per group and seed that ran more than once."""
    return [duplicate_line(duplicate) for duplicate in comparison.duplicates]


def print_notes(comparison: Comparison, stream: TextIO | None = None) -> None:
    """Write :func:`duplicate_lines` to ``stream`` (default: stderr)."""
    stream = stream or sys.stderr
    for line in duplicate_lines(comparison):
        print(line, file=stream)
    stream.flush()


def table_title(comparison: Comparison) -> str:
    """``METRIC: N finished runs``, and how many more runs were left out as repeats of a seed."""
    title = f"{comparison.metric}: {sum(group.n for group in comparison.groups)} finished runs"
    repeats = sum(len(duplicate.dropped) for duplicate in comparison.duplicates)
    return f"{title} ({repeats} run{'s' * (repeats != 1)} repeating a seed not counted)" if repeats else title


def natural_width(titles: list[str], rows: list[list[str]]) -> int:
    """The width of a rich table (one space of padding, one border per column) with no wrapping."""
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, title in enumerate(titles)]
    return sum(widths) + 3 * len(widths) + 1


def print_table(comparison: Comparison, console: Console | None = None) -> None:
    """A rich table (best row bold) with the runs left out listed below it; repeated seeds noted on stderr."""
    print_notes(comparison)
    console = console or Console()
    if comparison.groups:
        table = Table(title=table_title(comparison), caption=caption(comparison))
        for index, title in enumerate(header(comparison)):
            numeric = len(key_columns(comparison)) <= index < len(key_columns(comparison)) + 3
            table.add_column(title, justify="right" if numeric else "left")
        for group, row in zip(comparison.groups, human_rows(comparison)):
            table.add_row(*(Text(cell) for cell in row), style="bold" if group.best else None)
        if not console.is_terminal:  # a pipe or a file: never wrap or cut the table
            console.width = max(console.width, natural_width(header(comparison), human_rows(comparison)))
        console.print(table)
    else:
        console.print("no finished runs", highlight=False)
    for line in excluded_lines(comparison):
        console.print(Text(line), soft_wrap=True)


def escape_markdown(text: str) -> str:
    """Escape the cell separator of a GitHub table."""
    return text.replace("|", "\\|")


def render_markdown(comparison: Comparison) -> str:
    """A GitHub table (best row bold), the caption, and the runs left out as a list."""
    titles = header(comparison)
    numeric = len(key_columns(comparison))
    lines = [
        "| " + " | ".join(escape_markdown(title) for title in titles) + " |",
        "| " + " | ".join("---:" if numeric <= i < numeric + 3 else "---" for i in range(len(titles))) + " |",
    ]
    for group, row in zip(comparison.groups, human_rows(comparison)):
        cells = [escape_markdown(cell) for cell in row]
        if group.best:
            cells = [f"**{cell}**" if cell else cell for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + f"\n\n{caption(comparison)}\n" if comparison.groups else "no finished runs\n"
    excluded = excluded_lines(comparison)
    return text + ("\n" + "\n".join(f"- {line}" for line in excluded) + "\n" if excluded else "")


LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
"""LaTeX's special characters and how to write them in text."""


def escape_latex(text: str) -> str:
    """Escape LaTeX's special characters."""
    return "".join(LATEX_SPECIALS.get(char, char) for char in text)


def render_latex(comparison: Comparison) -> str:
    """A ``tabular`` with booktabs rules (best row bold); caption and left-out runs as comments."""
    keys = key_columns(comparison)
    titles = [*(escape_latex(key) for key in keys), f"{escape_latex(comparison.metric)} (\\%)", "$n$", r"$\Delta$ (pp)"]
    lines = [r"\begin{tabular}{" + "l" * len(keys) + "rrr}", r"\toprule", " & ".join(titles) + r" \\", r"\midrule"]
    for group in comparison.groups:
        spread = "-" if group.std is None else percent(group.std)
        n = f"{group.n}$^\\dagger$" if group.unequal_seeds else str(group.n)
        cells = [*(escape_latex(cell) for cell in key_cells(group)), f"{percent(group.mean)} $\\pm$ {spread}", n, delta(group)]
        if group.best:
            cells = [rf"\textbf{{{cell}}}" for cell in cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", f"% {caption(comparison)}; best row in bold"]
    if any(group.unequal_seeds for group in comparison.groups):
        lines.append("% $^\\dagger$: fewer seeds than the largest group")
    lines += [f"% {line}" for line in excluded_lines(comparison)]
    return "\n".join(lines) + "\n"


def row_dicts(comparison: Comparison) -> list[dict[str, Any]]:
    """One dict per group with raw values (fractions, not percent)."""
    return [
        {
            "group": group.values,
            "metric": comparison.metric,
            "mean": group.mean,
            "std": group.std,
            "n": group.n,
            "delta": group.delta,
            "best": group.best,
            "baseline": group.baseline,
            "unequal_seeds": group.unequal_seeds,
            "seeds": group.seeds,
            "scores": group.scores,
            "runs": [str(run.path) for run in group.runs],
        }
        for group in comparison.groups
    ]


def render_json(comparison: Comparison) -> str:
    """The groups as a JSON list of row dicts."""
    return json.dumps(row_dicts(comparison), indent=2) + "\n"


def render_csv(comparison: Comparison) -> str:
    """The groups as CSV: the differing keys, then raw statistics (std empty for one run)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*comparison.keys, "mean", "std", "n", "delta", "best", "baseline", "unequal_seeds", "seeds"])
    for group in comparison.groups:
        keys = ["" if value is None else format_value(value) for value in group.values.values()]
        std = "" if group.std is None else group.std
        seeds = " ".join(str(seed) for seed in group.seeds)
        writer.writerow([*keys, group.mean, std, group.n, group.delta, group.best, group.baseline, group.unequal_seeds, seeds])
    return buffer.getvalue()


RENDERERS = {"md": render_markdown, "csv": render_csv, "latex": render_latex, "json": render_json}
"""Text renderers of the non-table formats."""
