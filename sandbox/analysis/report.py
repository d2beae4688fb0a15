"""Render a :class:`~sandbox.analysis.compare.Comparison`: rich table, Markdown, CSV, LaTeX, JSON.

One renderer for ``sandbox compare`` and the table that ends ``sandbox ablate``. Each group gets
the metric as ``mean ± std`` over its runs (``std`` is ``-`` for a single run), the other summary
value next to it (``final_miou`` beside ``best_miou`` and the other way round; left out when no
group has it for all its runs, ``-`` for a group one of whose runs lacks it), n, the difference of
the means to the baseline (Δ), and the paired Δ (:mod:`sandbox.analysis.paired`): mean ± sample
std of the per-seed differences to the baseline run of the same seed, the number of pairs and the
95% Student-t confidence interval of the paired mean (``-`` for the baseline itself or without
pairs; ``n/a (1 pair)`` for a single pair; ``degenerate: all N differences equal`` for a
zero-width interval, which never counts as excluding 0), and each pair's difference (``Δ by
seed``, ``SEED: points``). A key column shows ``-`` for a group whose recipes lack the key.

Human formats (``table``, ``md``, ``latex``) show percent with two decimals and differences in
signed percentage points; the notes say ``best``, ``baseline``, ``unequal seeds``, when the
interval excludes 0 and which seeds one of the two groups lacks (they take no part in the paired
Δ); LaTeX marks the interval with ``$^*$`` and lists those seeds as ``%`` comments. The runs left
out (unfinished, failed) are listed below the table (as ``%`` comments in LaTeX). Machine formats
(``csv``, ``json``) hold raw fractions (empty cells in CSV, null in JSON, never NaN, where
undefined) and keep stdout parseable: the runs left out go to stderr. CSV keeps its first columns
(keys, mean, std, n, delta, best, baseline, unequal_seeds, seeds) and appends the secondary value's
and the paired Δ's; both say in ``ci_status`` whether the interval is informative
(:attr:`~sandbox.analysis.paired.PairedDelta.ci_status`: ``ok``, ``zero_variance``, ``one_pair``,
``no_pairs``). In every format, a seed that ran more than once in a group counts once and a
``note:`` line on stderr names the runs (:func:`duplicate_lines`); when ``--columns`` hides a
differing key, a ``warning:`` line names it (:func:`hidden_keys_line`), and when the runs may be
scored on different data (another dataset, val set or class list), a ``warning:`` line says so
(:func:`dataset_line`).
"""

from __future__ import annotations

import csv
import io
import statistics
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sandbox.analysis.compare import Comparison, Duplicate, Group, format_value
from sandbox.analysis.paired import CI_ONE_PAIR, CI_ZERO_VARIANCE, CONFIDENCE_LEVEL, PairedDelta
from sandbox.rundir.files import strict_json

HUMAN_FORMATS = ("table", "md", "latex")
"""Formats that list the runs left out below the table (the others write them to stderr)."""

INTERVAL_TITLE = f"{100 * CONFIDENCE_LEVEL:g}% CI (pp)"
"""Column title of the confidence interval of the paired Δ."""

BY_SEED_TITLE = "Δ by seed (pp)"
"""Column title of the per-seed differences to the baseline (``SEED: points``)."""


# --- statistics and cells ----------------------------------------------------------------------


def percent(value: float | None) -> str:
    """A fraction as a percentage with two decimals; ``-`` for None (never scored)."""
    return "-" if value is None else f"{100 * value:.2f}"


def signed_points(value: float) -> str:
    """A difference of fractions in signed percentage points with two decimals."""
    return f"{100 * value:+.2f}"


def mean_and_std(scores: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (``ddof=1``; None for one score) of non-empty ``scores``."""
    return statistics.fmean(scores), statistics.stdev(scores) if len(scores) > 1 else None


def mean_std(scores: list[float] | None) -> str:
    """``mean ± std`` of fractions in percent; ``-`` for the std of one score, ``-`` alone for none."""
    if not scores:
        return "-"
    mean, spread = mean_and_std(scores)
    return f"{percent(mean)} ± {percent(spread)}"


def paired_cell(paired: PairedDelta | None) -> str:
    """``mean ± std`` of the per-seed differences in signed points; ``-`` for the baseline or without pairs."""
    if paired is None or paired.mean is None:
        return "-"
    spread = "-" if paired.std is None else f"{100 * paired.std:.2f}"
    return f"{signed_points(paired.mean)} ± {spread}"


def pairs_cell(paired: PairedDelta | None) -> str:
    """The number of pairs; ``-`` for the baseline."""
    return "-" if paired is None else str(paired.n)


def interval_cell(paired: PairedDelta | None) -> str:
    """``[low, high]`` in signed points; ``n/a (1 pair)``, ``degenerate: all N differences equal`` (an
    interval of width 0), or ``-`` (the baseline, no pairs) where it is not informative."""
    if paired is not None and paired.ci_status == CI_ONE_PAIR:
        return "n/a (1 pair)"
    if paired is not None and paired.ci_status == CI_ZERO_VARIANCE:
        return f"degenerate: all {paired.n} differences equal"
    interval = None if paired is None else paired.interval
    return "-" if interval is None else f"[{signed_points(interval[0])}, {signed_points(interval[1])}]"


def by_seed_cell(paired: PairedDelta | None) -> str:
    """Each pair's difference as ``SEED: ±points``, in the group's seed order; ``-`` for the baseline or without pairs."""
    if paired is None or not paired.deltas:
        return "-"
    return ", ".join(f"{format_value(seed)}: {signed_points(delta)}" for seed, delta in zip(paired.seeds, paired.deltas))


def excludes_zero(paired: PairedDelta | None) -> bool:
    """Whether the group has an informative confidence interval of its paired Δ and it excludes 0."""
    return paired is not None and bool(paired.excludes_zero)


def seed_list(seeds: list[Any]) -> str:
    """Seeds as ``1, 2`` (``-`` for a run without a seed)."""
    return ", ".join(format_value(seed) for seed in seeds)


def unpaired_marks(paired: PairedDelta | None) -> list[str]:
    """The seeds of the group, and of the baseline, that have no partner (none for the baseline itself)."""
    if paired is None:
        return []
    marks = []
    if paired.only_here:
        marks.append(f"seeds not in baseline: {seed_list(paired.only_here)}")
    if paired.only_in_baseline:
        marks.append(f"baseline seeds missing: {seed_list(paired.only_in_baseline)}")
    return marks


def notes(group: Group, comparison: Comparison) -> str:
    """``best``, ``baseline``, ``unequal seeds (n of max)``, ``CI excludes 0`` and the :func:`unpaired_marks`, as they apply."""
    largest = max(other.n for other in comparison.groups)
    marks = ["best"] * group.best + ["baseline"] * group.baseline
    if group.unequal_seeds:
        marks.append(f"unequal seeds ({group.n} of {largest})")
    marks += ["CI excludes 0"] * excludes_zero(group.paired) + unpaired_marks(group.paired)
    return ", ".join(marks)


# --- the columns of the human formats ----------------------------------------------------------


def key_columns(comparison: Comparison) -> list[str]:
    """The differing keys, or a single ``group`` column when every run shares one configuration."""
    return comparison.keys or ["group"]


def key_cells(group: Group) -> list[str]:
    """The group's values of the differing keys (``-`` where its recipes lack one; ``all runs`` when there are none)."""
    return [format_value(value) for value in group.values.values()] or [group.label()]


def shown_metrics(comparison: Comparison) -> list[str]:
    """The metric, then the secondary value when it is shown."""
    return [comparison.metric] + [comparison.secondary] * comparison.shows_secondary


def metric_cells(group: Group, comparison: Comparison) -> list[str]:
    """The group's ``mean ± std`` of the metric, then of the secondary value when it is shown."""
    return [mean_std(group.scores)] + [mean_std(group.secondary_scores)] * comparison.shows_secondary


def header(comparison: Comparison) -> list[str]:
    """Column titles of the human formats."""
    return [
        *key_columns(comparison), *(f"{metric} (%)" for metric in shown_metrics(comparison)), "n", "Δ (pp)",
        "paired Δ (pp)", "pairs", INTERVAL_TITLE, BY_SEED_TITLE, "notes",
    ]


def numeric_columns(comparison: Comparison) -> range:
    """Indices of the right-aligned columns of :func:`header`: all but the keys and the notes."""
    return range(len(key_columns(comparison)), len(header(comparison)) - 1)


def human_row(group: Group, comparison: Comparison) -> list[str]:
    """One group's cells, in the order of :func:`header`."""
    return [
        *key_cells(group), *metric_cells(group, comparison), str(group.n), signed_points(group.delta),
        paired_cell(group.paired), pairs_cell(group.paired), interval_cell(group.paired), by_seed_cell(group.paired),
        notes(group, comparison),
    ]


def human_rows(comparison: Comparison) -> list[list[str]]:
    """One row of cells per group, in the order of :func:`header`."""
    return [human_row(group, comparison) for group in comparison.groups]


def caption(comparison: Comparison) -> str:
    """What the numbers are, which group is the baseline, and what the paired Δ is."""
    reference = comparison.baseline
    base = f"; Δ vs baseline {reference.label()}" if reference is not None else ""
    return (
        f"mean ± sample std (ddof=1) over seeds, - for n=1{base}; paired Δ: mean ± sample std of the differences "
        f"to the baseline run of the same seed, with its {100 * CONFIDENCE_LEVEL:g}% Student-t CI "
        "(n/a for one pair, degenerate when all differences are equal)"
    )


def table_title(comparison: Comparison) -> str:
    """``METRIC: N finished runs``, and how many more runs were left out as repeats of a seed."""
    title = f"{comparison.metric}: {sum(group.n for group in comparison.groups)} finished runs"
    repeats = sum(len(duplicate.dropped) for duplicate in comparison.duplicates)
    return f"{title} ({repeats} run{'s' * (repeats != 1)} repeating a seed not counted)" if repeats else title


# --- lines besides the table: runs left out, repeated seeds, hidden keys ------------------------


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


def hidden_keys_line(comparison: Comparison) -> str | None:
    """``warning: ...`` naming the differing keys no column shows; None when every one is shown."""
    if not comparison.hidden_keys:
        return None
    hidden = ", ".join(comparison.hidden_keys)
    shown = ",".join(comparison.keys)
    return f"warning: the groups also differ in {hidden}, which --columns {shown} does not show: rows compare more than their columns say"


def dataset_line(comparison: Comparison) -> str | None:
    """``warning: ...`` when the runs may be scored on different data
    (:attr:`~sandbox.analysis.compare.Comparison.dataset_differences`); None when they share one dataset."""
    if not comparison.dataset_differences:
        return None
    what = ", ".join(comparison.dataset_differences)
    return (
        f"warning: the runs are not all on one dataset (they differ in {what}): each is scored on its own val set "
        "and classes, so Δ and paired Δ compare different data, not methods"
    )


def compute_line(comparison: Comparison) -> str | None:
    """``warning: ...`` when the runs computed on different threads, CPU kernels or devices
    (:attr:`~sandbox.analysis.compare.Comparison.compute_differences`); None when they did not."""
    if not comparison.compute_differences:
        return None
    what = "; ".join(comparison.compute_differences)
    return (
        f"warning: the runs did not all compute alike (they differ in {what}): the order of floating-point sums "
        "differs, and one seed can end points apart; Δ and paired Δ mix that with the methods"
    )


def unrecorded_line(comparison: Comparison) -> str | None:
    """``note: ...`` when some counted runs were saved before runs recorded what they computed on."""
    if not comparison.unrecorded:
        return None
    return (
        f"note: {comparison.unrecorded} of the runs were saved before summary.json recorded their threads, CPU "
        "kernels and device: whether they computed like the others is not known"
    )


def stderr_lines(comparison: Comparison) -> list[str]:
    """The notes on repeated seeds, then the warnings on mixed datasets, on the runs' arithmetic and on hidden keys."""
    lines = (dataset_line(comparison), compute_line(comparison), unrecorded_line(comparison), hidden_keys_line(comparison))
    warnings = [line for line in lines if line]
    return duplicate_lines(comparison) + warnings


def print_notes(comparison: Comparison, stream: TextIO | None = None) -> None:
    """Write :func:`stderr_lines` to ``stream`` (default: stderr)."""
    stream = stream or sys.stderr
    for line in stderr_lines(comparison):
        print(line, file=stream)
    stream.flush()


# --- rich table --------------------------------------------------------------------------------


def natural_width(titles: list[str], rows: list[list[str]]) -> int:
    """The width of a rich table (one space of padding, one border per column) with no wrapping."""
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, title in enumerate(titles)]
    return sum(widths) + 3 * len(widths) + 1


def print_table(comparison: Comparison, console: Console | None = None) -> None:
    """A rich table (best row bold) with the runs left out listed below it; notes and warnings on stderr."""
    print_notes(comparison)
    console = console or Console()
    if comparison.groups:
        titles, rows, numeric = header(comparison), human_rows(comparison), numeric_columns(comparison)
        # text, not markup: a value such as [bg,cat] would be read as a markup tag and vanish
        table = Table(title=Text(table_title(comparison)), caption=Text(caption(comparison)))
        for index, title in enumerate(titles):
            table.add_column(title, justify="right" if index in numeric else "left")
        for group, row in zip(comparison.groups, rows):
            table.add_row(*(Text(cell) for cell in row), style="bold" if group.best else None)
        if not console.is_terminal:  # a pipe or a file: never wrap or cut the table
            console.width = max(console.width, natural_width(titles, rows))
        console.print(table)
    else:
        console.print("no finished runs", highlight=False)
    for line in excluded_lines(comparison):
        console.print(Text(line), soft_wrap=True)


# --- Markdown ----------------------------------------------------------------------------------


def escape_markdown(text: str) -> str:
    """Escape the cell separator of a GitHub table."""
    return text.replace("|", "\\|")


def render_markdown(comparison: Comparison) -> str:
    """A GitHub table (best row bold), the caption, and the runs left out as a list."""
    titles, numeric = header(comparison), numeric_columns(comparison)
    lines = [
        "| " + " | ".join(escape_markdown(title) for title in titles) + " |",
        "| " + " | ".join("---:" if i in numeric else "---" for i in range(len(titles))) + " |",
    ]
    for group, row in zip(comparison.groups, human_rows(comparison)):
        cells = [escape_markdown(cell) for cell in row]
        if group.best:
            cells = [f"**{cell}**" if cell else cell for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + f"\n\n{caption(comparison)}\n" if comparison.groups else "no finished runs\n"
    excluded = excluded_lines(comparison)
    return text + ("\n" + "\n".join(f"- {line}" for line in excluded) + "\n" if excluded else "")


# --- LaTeX -------------------------------------------------------------------------------------


LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
"""LaTeX's special characters and how to write them in text."""


def escape_latex(text: str) -> str:
    """Escape LaTeX's special characters."""
    return "".join(LATEX_SPECIALS.get(char, char) for char in text)


def latex_row(group: Group, comparison: Comparison) -> str:
    """One group's cells joined by ``&`` (bold for the best; ``$^\\dagger$`` unequal seeds, ``$^*$`` CI excludes 0)."""
    n = f"{group.n}$^\\dagger$" if group.unequal_seeds else str(group.n)
    interval = interval_cell(group.paired) + "$^*$" * excludes_zero(group.paired)
    cells = [
        *(escape_latex(cell) for cell in key_cells(group)),
        *(cell.replace("±", "$\\pm$") for cell in metric_cells(group, comparison)),
        n, signed_points(group.delta), paired_cell(group.paired).replace("±", "$\\pm$"), pairs_cell(group.paired), interval,
        by_seed_cell(group.paired),
    ]
    if group.best:
        cells = [rf"\textbf{{{cell}}}" for cell in cells]
    return " & ".join(cells) + r" \\"


def latex_comments(comparison: Comparison) -> list[str]:
    """The ``%`` lines below the tabular: caption, marks, unpaired seeds, runs left out."""
    lines = [f"% {caption(comparison)}; best row in bold"]
    if any(group.unequal_seeds for group in comparison.groups):
        lines.append("% $^\\dagger$: fewer seeds than the largest group")
    if any(excludes_zero(group.paired) for group in comparison.groups):
        lines.append(f"% $^*$: the {100 * CONFIDENCE_LEVEL:g}\\% CI of the paired $\\Delta$ excludes 0")
    for group in comparison.groups:
        marks = unpaired_marks(group.paired)
        if marks:
            lines.append(f"% {group.label()}: {'; '.join(marks)}")
    return lines + [f"% {line}" for line in excluded_lines(comparison)]


def render_latex(comparison: Comparison) -> str:
    """A ``tabular`` with booktabs rules (best row bold); caption, marks and left-out runs as comments."""
    keys = key_columns(comparison)
    metrics = [f"{escape_latex(metric)} (\\%)" for metric in shown_metrics(comparison)]
    titles = [
        *(escape_latex(key) for key in keys), *metrics, "$n$", r"$\Delta$ (pp)",
        r"paired $\Delta$ (pp)", "pairs", f"{100 * CONFIDENCE_LEVEL:g}\\% CI (pp)", r"$\Delta$ by seed (pp)",
    ]
    spec = "l" * len(keys) + "r" * (len(titles) - len(keys))
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule", " & ".join(titles) + r" \\", r"\midrule"]
    lines += [latex_row(group, comparison) for group in comparison.groups]
    lines += [r"\bottomrule", r"\end{tabular}", *latex_comments(comparison)]
    return "\n".join(lines) + "\n"


# --- JSON --------------------------------------------------------------------------------------


def secondary_dict(group: Group, comparison: Comparison) -> dict[str, Any] | None:
    """The secondary value's statistics over the group's runs (raw fractions); None when a run lacks it."""
    scores = group.secondary_scores
    if not scores:
        return None
    mean, spread = mean_and_std(scores)
    return {"metric": comparison.secondary, "mean": mean, "std": spread, "scores": scores}


def paired_dict(paired: PairedDelta | None) -> dict[str, Any] | None:
    """The paired Δ as raw fractions (null where undefined); None for the baseline group."""
    if paired is None:
        return None
    interval = paired.interval
    return {
        "seeds": paired.seeds,
        "deltas": paired.deltas,
        "n": paired.n,
        "mean": paired.mean,
        "std": paired.std,
        "level": paired.level,
        "ci_low": None if interval is None else interval[0],
        "ci_high": None if interval is None else interval[1],
        "excludes_zero": paired.excludes_zero,
        "ci_status": paired.ci_status,
        "seeds_only_here": paired.only_here,
        "seeds_only_in_baseline": paired.only_in_baseline,
    }


def row_dict(group: Group, comparison: Comparison) -> dict[str, Any]:
    """One group with raw values (fractions, not percent; None where a recipe lacks a key or a value is undefined)."""
    return {
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
        "secondary": secondary_dict(group, comparison),
        "paired": paired_dict(group.paired),
    }


def row_dicts(comparison: Comparison) -> list[dict[str, Any]]:
    """One :func:`row_dict` per group."""
    return [row_dict(group, comparison) for group in comparison.groups]


def render_json(comparison: Comparison) -> str:
    """The groups as a JSON list of row dicts (strict JSON: a non-finite value, e.g. a recipe's ``nan``, is ``null``)."""
    return strict_json(row_dicts(comparison), indent=2) + "\n"


# --- CSV ---------------------------------------------------------------------------------------


CSV_STAT_COLUMNS = ["mean", "std", "n", "delta", "best", "baseline", "unequal_seeds", "seeds"]
"""The first columns after the keys: the metric's raw statistics."""

CSV_PAIRED_COLUMNS = [
    "paired_n", "paired_delta", "paired_std", "ci_low", "ci_high", "ci_excludes_zero",
    "paired_seeds", "deltas", "seeds_only_here", "seeds_only_in_baseline", "ci_status",
]
"""Columns of the paired Δ, last in the CSV (after those of the secondary value); ``ci_status``
(:attr:`~sandbox.analysis.paired.PairedDelta.ci_status`) last of all."""


def blank(value: Any) -> Any:
    """``value``, or an empty cell for None."""
    return "" if value is None else value


def csv_header(comparison: Comparison) -> list[str]:
    """The keys, :data:`CSV_STAT_COLUMNS`, the secondary value's mean and std, :data:`CSV_PAIRED_COLUMNS`."""
    secondary = comparison.secondary
    return [*comparison.keys, *CSV_STAT_COLUMNS, f"{secondary}_mean", f"{secondary}_std", *CSV_PAIRED_COLUMNS]


def csv_stat_cells(group: Group) -> list[Any]:
    """The keys' values (empty where the recipes lack one) and the cells of :data:`CSV_STAT_COLUMNS`."""
    keys = ["" if value is None else format_value(value) for value in group.values.values()]
    seeds = " ".join(str(seed) for seed in group.seeds)
    return [*keys, group.mean, blank(group.std), group.n, group.delta, group.best, group.baseline, group.unequal_seeds, seeds]


def csv_secondary_cells(group: Group) -> list[Any]:
    """Mean and std of the secondary value (empty where a run lacks it, std empty for one run)."""
    if not group.secondary_scores:
        return ["", ""]
    mean, spread = mean_and_std(group.secondary_scores)
    return [mean, blank(spread)]


def csv_paired_cells(paired: PairedDelta | None) -> list[Any]:
    """The cells of :data:`CSV_PAIRED_COLUMNS` (empty for the baseline and where undefined)."""
    if paired is None:
        return [""] * len(CSV_PAIRED_COLUMNS)
    interval = paired.interval or (None, None)
    seeds = [" ".join(format_value(seed) for seed in seeds) for seeds in (paired.seeds, paired.only_here, paired.only_in_baseline)]
    deltas = " ".join(repr(value) for value in paired.deltas)
    return [
        paired.n, blank(paired.mean), blank(paired.std), blank(interval[0]), blank(interval[1]),
        blank(paired.excludes_zero), seeds[0], deltas, seeds[1], seeds[2], paired.ci_status,
    ]


def render_csv(comparison: Comparison) -> str:
    """The groups as CSV with raw values, in the columns of :func:`csv_header`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(comparison))
    for group in comparison.groups:
        writer.writerow([*csv_stat_cells(group), *csv_secondary_cells(group), *csv_paired_cells(group.paired)])
    return buffer.getvalue()


RENDERERS = {"md": render_markdown, "csv": render_csv, "latex": render_latex, "json": render_json}
"""Text renderers of the non-table formats."""

FORMATS = ("table", *RENDERERS)
"""Every output format of a comparison: the rich table, then the text renderers' (the one list the CLI offers)."""
