"""``sandbox probe``: what feature perturbations do to a trained run's model, against noise of equal norm."""

from __future__ import annotations

import re
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sandbox.rundir.files import strict_json
from sandbox.cli.common import PluginOption, writing_to
from sandbox.errors import SandboxError

if TYPE_CHECKING:
    from torch import Tensor

    from sandbox.analysis.probe import PerturbationFigures, Spread
    from sandbox.analysis.probe_models import ProbedRun
    from sandbox.recipe import TrainSection

PROBE_FOLDER = "probe"
"""Default output folder, inside the run directory."""

DEFAULT_IMAGES = 8
"""Unlabeled crops probed by default."""

HEADERS = ("perturbation", "view", "rel. norm median [p10, p90]", "flipped (%)", "density Δ log-lik.", "trusted (%)")
"""Columns of the text and markdown tables."""


TABLE_WIDTH = 110
"""The least width the text table is printed at."""

PROGRESS_EVERY_S = 5.0
"""Seconds between two progress lines on stderr: a probe that ends sooner prints none."""


class Progress:
    """Progress of one long phase as ``probe: WHAT DONE/TOTAL crops (S s)`` lines on stderr, at most one
    every :data:`PROGRESS_EVERY_S` seconds; called with the number of crops done so far."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        """Print a line when :data:`PROGRESS_EVERY_S` seconds passed since the last one (or the start)."""
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            typer.echo(f"probe: {self.what} {done}/{self.total} crops ({now - self.start:.0f} s)", err=True)


def available_images(run: ProbedRun, images: int) -> int:
    """``--images``, or the number of the run's unlabeled images when it holds fewer (with a note on
    stderr): each image is probed once, never as a second random crop of itself."""
    count = len(run.source.unlabeled)
    if 0 < count < images:
        note = f"note: --images {images}: the run's unlabeled set holds only {count} images; probing those {count}"
        typer.echo(note, err=True)
        return count
    return images


class Format(str, Enum):
    """How the figures are printed."""

    text = "text"
    md = "md"
    json = "json"


def figure_name(name: str, perturb_at: str) -> str:
    """The grid's file name for perturbation ``name`` (anything but letters, digits, ``-`` and ``_``
    becomes ``_``), suffixed ``-encoder`` when it perturbs the encoder's maps."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) + ("-encoder" if perturb_at == "encoder" else "") + ".png"


def spread_text(spread: Spread) -> str:
    """``median [p10, p90]`` with three decimals, ``-`` without pixels."""
    if spread.median != spread.median:  # NaN
        return "-"
    return f"{spread.median:.3f} [{spread.p10:.3f}, {spread.p90:.3f}]"


def number_text(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    """``value * scale`` with ``digits`` decimals; ``-`` for None or NaN."""
    return "-" if value is None or value != value else f"{value * scale:.{digits}f}"


def table_rows(results: list[PerturbationFigures]) -> list[tuple[str, ...]]:
    """Two rows per perturbation: its step, and noise of the same per-pixel norm."""
    rows = []
    for result in results:
        for view, figures in (("step", result.step), ("noise", result.noise)):
            name = result.name if view == "step" else ""
            trusted = number_text(result.trusted_fraction, 100, 1) if view == "step" else ""
            rows.append((name, view, spread_text(figures.relative_norm), number_text(figures.flipped_fraction, 100, 2),
                         number_text(figures.density_change, 1, 3), trusted))
    return rows


def markdown(rows: list[tuple[str, ...]]) -> str:
    """A GitHub markdown table of ``rows`` under :data:`HEADERS`."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(HEADERS))) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def print_table(rows: list[tuple[str, ...]], title: str) -> None:
    """The figures as a rich table."""
    table = Table()
    for index, header in enumerate(HEADERS):
        table.add_column(Text(header), justify="left" if index < 2 else "right", no_wrap=True)
    for index, row in enumerate(rows):
        if index and index % 2 == 0:
            table.add_section()
        table.add_row(*map(Text, row))  # brackets are text, not rich markup
    console = Console()
    console = Console(width=max(console.width, TABLE_WIDTH))  # a pipe's 80 columns would wrap the figures
    console.print(Text(title), soft_wrap=True)  # holds a path: one line, never wrapped
    console.print(table)


def check_perturb_at(run: ProbedRun, perturb_at: str, uses_density: bool, name: str) -> None:
    """One-line errors for a perturbation the network or the estimator cannot take at ``perturb_at``."""
    if perturb_at != "encoder":
        return
    if not run.student.network.has_encoder_maps():
        raise SandboxError(
            f"--perturb-at encoder: [model] {run.recipe.model.name!r} does not expose its encoder's maps "
            "(extract/decode); use --perturb-at classifier"
        )
    if uses_density:
        raise SandboxError(
            f"--perturbation {name!r} uses the density of the classifier's embedding: it perturbs the classifier's "
            "input, not the encoder's maps; use --perturb-at classifier"
        )


def probe_one(
    run: ProbedRun, settings: TrainSection, name: str, images: Tensor, padding: Tensor, out: Path
) -> PerturbationFigures:
    """Probe perturbation ``name`` and draw its grid into ``out``."""
    from sandbox.analysis.colours import full_palette
    from sandbox.analysis.probe_figure import plot_probe_grid
    from sandbox.analysis.probe_models import build_probed_method
    from sandbox.analysis.probe_pass import probe_perturbation, summarise

    method = build_probed_method(run, name)
    check_perturb_at(run, settings.perturb_at, method.perturbation.uses_density, name)
    progress = Progress(name, images.shape[0])
    outcomes = probe_perturbation(run, method, settings, images, padding, run.recipe.train.unlabeled_batch_size, progress)
    options = run.recipe.perturbation.options() if name == run.recipe.perturbation.name else {}
    result = summarise(name, outcomes, options)
    palette = full_palette(run.source.palette, run.source.num_classes)
    with writing_to(out):
        path = plot_probe_grid(outcomes, palette, run.source.ignore_index, out / figure_name(name, settings.perturb_at),
                               f"{run.recipe.name}: {name} (perturb_at = {settings.perturb_at})")
    result.figure = str(path)
    return result


def run_folder(path: Path) -> Path:
    """The run folder ``path`` names: itself, or the folder of the run's ``recipe.toml`` when given that file."""
    from sandbox.rundir.files import RECIPE_FILE

    return path.parent if path.is_file() and path.name == RECIPE_FILE else path


def load_probed_run(run_dir: Path, plugins: list[str], names: list[str]) -> ProbedRun:
    """The run's recipe (``recipe.toml``, ``--plugin`` added) and trained models; ``names`` (the
    perturbations to probe, empty: the run's own) are checked first."""
    from sandbox.analysis.probe_models import load_run, perturbation_recipe
    from sandbox.plugins import load_run_recipe
    from sandbox.rundir.files import RECIPE_FILE

    if not (run_dir / RECIPE_FILE).is_file():
        raise SandboxError(f"run directory {run_dir} holds no {RECIPE_FILE} (expected a run folder such as runs/<name>/seed0)")
    recipe, registry = load_run_recipe(run_dir / RECIPE_FILE, [], plugins)
    for name in names:  # an unknown name fails before the slow part
        perturbation_recipe(recipe, registry, name)
    return load_run(run_dir, recipe, registry)


def probe(
    run_dir: Path = typer.Argument(..., help="A run directory (holding recipe.toml and checkpoints).", show_default=False),
    perturbation: Optional[List[str]] = typer.Option(
        None, "--perturbation", help="A registered perturbation to probe (repeatable; default: the run's own)."
    ),
    images: int = typer.Option(
        DEFAULT_IMAGES, "--images", min=1, help="Unlabeled crops probed (seeded: always the same; at most one per unlabeled image)."
    ),
    format_: Format = typer.Option(Format.text, "--format", help="How the figures are printed: text, md or json."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNG grids (default: probe/ in the run directory)."),
    perturb_at: Optional[str] = typer.Option(
        None, "--perturb-at", help="Perturb the classifier's input or the encoder's maps (default: the run's train.perturb_at)."
    ),
    plugin: Optional[List[str]] = PluginOption,
) -> None:
    """Relative norm, flipped trusted pixels and density change of perturbation steps vs noise of equal norm."""
    from sandbox.analysis.probe_models import unlabeled_crops

    if perturb_at not in (None, "classifier", "encoder"):
        raise SandboxError(f"--perturb-at {perturb_at!r}: expected 'classifier' or 'encoder'")
    run_dir = run_folder(run_dir)
    run = load_probed_run(run_dir, list(plugin or []), list(perturbation or []))
    names = list(dict.fromkeys(perturbation or [run.recipe.perturbation.name]))
    settings = run.recipe.train.model_copy(update={"perturb_at": perturb_at or run.recipe.train.perturb_at})
    images = available_images(run, images)
    crops, padding = unlabeled_crops(run.source, run.recipe, images, Progress("reading", images))
    folder = out if out is not None else run_dir / PROBE_FOLDER
    results = [probe_one(run, settings, name, crops, padding, folder) for name in names]
    report(run, settings, results, images, format_)


def report(run: ProbedRun, settings: TrainSection, results: list[PerturbationFigures], images: int, format_: Format) -> None:
    """Print the figures in ``format_`` (json: one document on stdout, nothing else)."""
    if format_ is Format.json:
        document = {
            "run": run.recipe.name, "weights": run.weights, "images": images, "threshold": settings.threshold,
            "perturb_at": settings.perturb_at, "density": run.density is not None,
            "perturbations": [result.to_json() for result in results],
        }
        typer.echo(strict_json(document, indent=2))
        return
    title = f"{run.recipe.name}: {images} unlabeled crops, threshold {settings.threshold}, weights {run.weights}"
    rows = table_rows(results)
    if format_ is Format.md:
        typer.echo(f"{title}\n\n{markdown(rows)}\n")
    else:
        print_table(rows, title)
    for result in results:
        typer.echo(f"{result.name}: grid -> {result.figure}")
