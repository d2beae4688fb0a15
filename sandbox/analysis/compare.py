"""Group finished runs by the recipe keys that differ between them and compare a metric over seeds.

Runs are grouped by the values of every flattened ``recipe.toml`` key that differs between the
finished runs (``seed``, ``name`` and ``output_dir`` never count: they differ between the seeds
and copies of one configuration). A run saves only the recipe tables it used (a
``perturbation.name = "none"`` run has no ``[density]`` table, a network without a backbone no
``[backbone]``), so a key differs when the runs whose recipes have its table hold more than one
value: a key of a table only some runs saved, the same wherever it is, does not by itself tell
runs apart. A key missing from a table a run did save (an option of another plugin, or one left
to the plugin's default) counts as the value None. Where a differing key is absent from a run's
recipe, its value is None (shown as ``-``). Each group gets the mean and the sample standard deviation (``ddof=1``; None
for a single run) of the metric over its runs, and its difference to the baseline group's mean.

A seed counts once per group: when several finished runs of one group have the same seed (a run
copied to two folders, or trained again into another ``output_dir``), the first of them in the
order of the records is kept (for ``sandbox compare``: the run directory whose path sorts first)
and the others are left out of the statistics; :attr:`Comparison.duplicates` records each case,
and whether their results differ (the same recipe and seed gave other numbers: not reproducible).

Every group besides the baseline is also paired with it by seed (:mod:`sandbox.analysis.paired`):
the per-seed differences, their mean ± sample std and a 95% Student-t confidence interval of the
mean, and the seeds only one of the two ran. Each group also carries the other summary value of
:data:`METRICS` (``final_miou`` next to ``best_miou`` and the other way round) for its runs.
With ``columns``, :attr:`Comparison.hidden_keys` names the differing keys no column shows: the
rows then differ in more than what the table says they compare. :attr:`Comparison.dataset_differences`
says when the runs may be scored on different data (another dataset, val set or class list): their
Δ and paired Δ then compare scores of different things.
"""

from __future__ import annotations

import json
import math
import statistics
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from sandbox.analysis.paired import PairedDelta, pair_by_seed
from sandbox.analysis.runs import RunRecord
from sandbox.errors import SandboxError
from sandbox.recipe import setting_default

IGNORED_KEYS = frozenset({"seed", "name", "output_dir"})
"""Recipe keys that never separate groups."""

METRICS = ("best_miou", "final_miou")
"""Summary values a comparison can rank runs by."""

DEFAULT_BASELINE = ("perturbation.name", "none")
"""The default baseline group when one has these values: the method without a perturbed view."""

TRAINING_SPLIT_OPTIONS = frozenset(
    {"labeled", "num_labeled", "num_unlabeled", "split_file", "unlabeled_split_file", "aug", "check_files"}
)
"""``[dataset]`` options that choose only the training images: runs differing in them are scored on the
same val set with the same classes (every other ``dataset.*`` key may change the data scored)."""

VAL_SEEDED_DATASETS = frozenset({"shapes"})
"""Datasets whose ``dataset.seed`` also draws the val images (``shapes`` generates them from it); the
other built-ins draw only the labeled split from it."""

PER_CLASS_KEYS = ("best_per_class_iou", "final_per_class_iou")
"""Summary values keyed by class name: where a run's summary names its dataset's classes."""


@dataclass
class Group:
    """Runs sharing the values of the differing keys, and the metric's statistics over them."""

    values: dict[str, Any]
    """Differing key -> this group's value (None where its recipes lack the key; shown as ``-``)."""
    runs: list[RunRecord]
    scores: list[float]
    """The metric of each run, in the order of ``runs``."""
    delta: float = 0.0
    """``mean`` minus the baseline group's mean."""
    best: bool = False
    baseline: bool = False
    unequal_seeds: bool = False
    """True when this group has fewer runs than the largest group."""
    paired: PairedDelta | None = None
    """This group minus the baseline group, seed by seed; None for the baseline group itself."""
    secondary_scores: list[float] | None = None
    """:attr:`Comparison.secondary` of each run, in the order of ``runs``; None when a run lacks it."""

    @property
    def n(self) -> int:
        """Number of runs."""
        return len(self.scores)

    @property
    def mean(self) -> float:
        """Mean of the metric over the runs."""
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (``ddof=1``) over the runs; None for a single run."""
        return statistics.stdev(self.scores) if self.n > 1 else None

    @property
    def seeds(self) -> list[Any]:
        """The runs' seeds."""
        return [run.seed for run in self.runs]

    def label(self) -> str:
        """``key=value, ...`` of the differing keys (``all runs`` when none differ)."""
        return ", ".join(f"{key}={format_value(value)}" for key, value in self.values.items()) or "all runs"


@dataclass
class Duplicate:
    """Finished runs of one seed in one group: the run counted and the runs left out."""

    group: Group
    seed: Any
    kept: RunRecord
    dropped: list[RunRecord]

    @property
    def runs(self) -> list[RunRecord]:
        """The kept run, then the ones left out."""
        return [self.kept, *self.dropped]

    def differing_results(self) -> dict[str, list[Any]]:
        """Summary value (of :data:`METRICS`) -> each run's value, for the values that are not the same in all runs."""
        values = {metric: [(run.summary or {}).get(metric) for run in self.runs] for metric in METRICS}
        return {metric: seen for metric, seen in values.items() if len({_identity(value) for value in seen}) > 1}


@dataclass
class Comparison:
    """Groups of finished runs ranked by ``metric``, and the runs left out."""

    metric: str
    keys: list[str]
    """The differing recipe keys, in recipe order."""
    groups: list[Group]
    excluded: list[RunRecord] = field(default_factory=list)
    """Unfinished and failed runs."""
    duplicates: list[Duplicate] = field(default_factory=list)
    """Runs of a seed that their group already counts (see the module docstring), per group and seed."""
    hidden_keys: list[str] = field(default_factory=list)
    """Differing keys (see :func:`differing_keys`) that ``columns`` leaves out: groups differ in them
    too, though no column shows it."""
    dataset_differences: list[str] = field(default_factory=list)
    """Why the counted runs may not be scored on the same data (:func:`dataset_differences`): empty
    when they share one dataset, val set and class list as far as their files tell."""
    compute_differences: list[str] = field(default_factory=list)
    """How the counted runs' arithmetic differed (:func:`compute_differences`): threads, CPU kernels, device."""
    unrecorded: int = 0
    """Counted runs without a compute record beside runs with one (:func:`unrecorded_runs`)."""

    @property
    def baseline(self) -> Group | None:
        """The baseline group (None when no run finished)."""
        return next((group for group in self.groups if group.baseline), None)

    @property
    def secondary(self) -> str:
        """The summary value of :data:`METRICS` shown next to ``metric`` (``final_miou`` for ``best_miou``)."""
        return other_metric(self.metric)

    @property
    def shows_secondary(self) -> bool:
        """Whether every run of some group has :attr:`secondary` (else the table leaves its column out)."""
        return any(group.secondary_scores is not None for group in self.groups)


def other_metric(metric: str) -> str:
    """The summary value of :data:`METRICS` that is not ``metric``."""
    return next(other for other in METRICS if other != metric)


def format_value(value: Any) -> str:
    """A recipe value as text: ``-`` for None, TOML-like lists, plain numbers and strings."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(item) for item in value) + "]"
    return str(value)


def parse_value(raw: str) -> Any:
    """A ``--baseline`` value as TOML (``2`` -> 2, ``true`` -> True), else the string itself."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def table_of(key: str) -> str | None:
    """The top-level table of a flattened key (``density`` for ``density.lr``); None for a top-level value."""
    table, dot, _ = key.partition(".")
    return table if dot else None


def differing_keys(recipes: list[dict[str, Any]]) -> list[str]:
    """Keys (besides :data:`IGNORED_KEYS`) with more than one value among the recipes that have their table.

    A recipe without the key's top-level table (its run did not use it) takes no part, so a key of
    a table only some runs saved, the same wherever it is, does not differ. A recipe that has the
    table but not the key (an option left to the plugin's default) counts as None.
    """
    keys = list(dict.fromkeys(key for recipe in recipes for key in recipe if key not in IGNORED_KEYS))
    tables = [{table_of(key) for key in recipe} | {None} for recipe in recipes]
    return [
        key for key in keys
        if len({_identity(recipe.get(key)) for recipe, used in zip(recipes, tables) if table_of(key) in used}) > 1
    ]


def with_defaults(recipe: dict[str, Any] | None, saved_keys: set[str]) -> dict[str, Any] | None:
    """``recipe`` with the settings of the recipe's own sections that other runs saved (``saved_keys``:
    every key of every run's recipe) and it lacks (it was saved before they existed) at their defaults,
    what it ran with: a setting added to the sandbox does not split runs saved before it from runs
    saved after into two groups."""
    if recipe is None:
        return None
    tables = {table_of(key) for key in recipe}
    filled = dict(recipe)
    for key in saved_keys - recipe.keys():
        found, default = setting_default(key)
        if found and table_of(key) in tables:
            filled[key] = list(default) if isinstance(default, tuple) else default
    return filled


def _identity(value: Any) -> str:
    """A hashable stand-in for a recipe value (lists included)."""
    return json.dumps(value, sort_keys=True)


def _sort_key(values: dict[str, Any]) -> tuple[tuple[int, Any], ...]:
    """Numbers numerically, then strings and lists as text, absent values last."""
    def one(value: Any) -> tuple[int, Any]:
        if value is None:
            return (2, "")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (0, value)
        return (1, format_value(value))

    return tuple(one(value) for value in values.values())


def _score(run: RunRecord, metric: str) -> float | None:
    """The run's ``metric`` from its summary; None when it is no finite number."""
    value = (run.summary or {}).get(metric)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if number else None


def _matches(value: Any, raw: str) -> bool:
    """Whether a group's ``value`` is what ``--baseline KEY=raw`` names."""
    if value is None:
        return raw == "-"
    parsed = parse_value(raw)
    return value == parsed or format_value(value) == raw


def choose_baseline(groups: list[Group], keys: list[str], baseline: list[str]) -> Group:
    """The group named by ``KEY=VALUE`` pairs (all must match; the first such group), or the default.

    Without pairs: the first group whose ``perturbation.name`` is ``none`` when that key differs,
    else the first group.
    """
    if not baseline:
        key, value = DEFAULT_BASELINE
        if key in keys:
            return next((group for group in groups if group.values[key] == value), groups[0])
        return groups[0]
    pairs = []
    for text in baseline:
        key, sep, raw = text.partition("=")
        if not sep or key not in keys:
            differing = ", ".join(keys) or "none (all runs share one configuration)"
            raise SandboxError(f"--baseline {text!r}: expected KEY=VALUE with a key that differs between the runs: {differing}")
        pairs.append((key, raw))
    for group in groups:
        if all(_matches(group.values[key], raw) for key, raw in pairs):
            return group
    key = pairs[0][0]
    seen = ", ".join(dict.fromkeys(format_value(group.values[key]) for group in groups))
    raise SandboxError(f"--baseline {' '.join(baseline)}: no group matches; {key} takes the values {seen}")


def compare_runs(
    records: list[RunRecord], metric: str = "best_miou", baseline: list[str] | None = None, columns: list[str] | None = None
) -> Comparison:
    """Group the finished runs of ``records`` and rank them by ``metric`` (see the module docstring).

    Of several finished runs with one seed in one group, the first in ``records`` counts and the
    others are listed in :attr:`Comparison.duplicates`.

    ``columns`` (differing keys) limits the key columns shown; groups are still formed by every
    differing key, so the columns must tell every group apart.
    """
    if metric not in METRICS:
        raise SandboxError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    finished: list[tuple[RunRecord, float]] = []
    excluded: list[RunRecord] = []
    for run in records:
        score = _score(run, metric) if run.status == "finished" else None
        if run.status == "finished" and (score is None or run.recipe is None):
            missing = f"summary.json has no number {metric!r}" if score is None else "recipe.toml is missing"
            run = replace(run, failure=missing)
        if score is None or run.recipe is None or run.failure is not None:
            excluded.append(run)
        else:
            finished.append((run, score))
    saved_keys = {key for run, _ in finished for key in (run.recipe or {})}
    finished = [(replace(run, recipe=with_defaults(run.recipe, saved_keys)), score) for run, score in finished]
    keys = differing_keys([run.recipe for run, _ in finished if run.recipe is not None])
    by_values: dict[tuple[str, ...], Group] = {}
    by_seed: dict[tuple[tuple[str, ...], str], Duplicate] = {}
    duplicates: list[Duplicate] = []
    for run, score in finished:
        assert run.recipe is not None
        values = {key: run.recipe.get(key) for key in keys}
        identity = tuple(_identity(v) for v in values.values())
        group = by_values.setdefault(identity, Group(values, [], []))
        if run.seed is not None:  # a run without a seed cannot be matched: it always counts
            seen = by_seed.setdefault((identity, _identity(run.seed)), Duplicate(group, run.seed, run, []))
            if seen.kept is not run:
                if not seen.dropped:
                    duplicates.append(seen)
                seen.dropped.append(run)
                continue
        group.runs.append(run)
        group.scores.append(score)
    groups = sorted(by_values.values(), key=lambda group: _sort_key(group.values))
    if groups:
        reference = choose_baseline(groups, keys, list(baseline or []))
        reference.baseline = True
        max(groups, key=lambda group: group.mean).best = True
        largest = max(group.n for group in groups)
        for group in groups:
            group.delta = group.mean - reference.mean
            group.unequal_seeds = group.n < largest
            group.paired = None if group is reference else pair_by_seed(group.seeds, group.scores, reference.seeds, reference.scores)
            group.secondary_scores = scores_of(group, other_metric(metric))
    elif baseline:
        raise SandboxError(f"--baseline {' '.join(baseline)}: no run has finished")
    counted = [run for group in groups for run in group.runs]
    mixed = dataset_differences(counted, keys)
    hidden: list[str] = []
    if columns:
        hidden = [key for key in keys if key not in columns]
        keys = show_only(groups, keys, columns)
    return Comparison(metric, keys, groups, excluded, duplicates, hidden, mixed, compute_differences(counted), unrecorded_runs(counted))


def class_names(run: RunRecord) -> tuple[str, ...] | None:
    """The class names a run was scored on (the keys of its summary's per-class IoUs); None when its
    summary has none."""
    for key in PER_CLASS_KEYS:
        value = (run.summary or {}).get(key)
        if isinstance(value, dict) and value:
            return tuple(value)
    return None


def dataset_differences(runs: list[RunRecord], keys: list[str]) -> list[str]:
    """What tells ``runs`` may be scored on different data: each differing key (of ``keys``) of
    ``[dataset]`` but the :data:`TRAINING_SPLIT_OPTIONS` (and ``dataset.seed`` unless a run's dataset
    is one of :data:`VAL_SEEDED_DATASETS`), then ``class names`` when their summaries name other
    classes. Empty when they share one dataset, val set and class list as far as their files tell."""
    seeded_val = any((run.recipe or {}).get("dataset.name") in VAL_SEEDED_DATASETS for run in runs)
    found = []
    for key in keys:
        table, _, option = key.partition(".")
        if table != "dataset" or option in TRAINING_SPLIT_OPTIONS or (option == "seed" and not seeded_val):
            continue
        found.append(key)
    if len({names for names in map(class_names, runs) if names is not None}) > 1:
        found.append("class names")
    return found


COMPUTE_KEYS = ("device", "threads", "cpu_capability", "gpu", "deterministic")
"""The entries of a summary's ``compute`` record (``sandbox.train.determinism.compute_record``) that change
a run's arithmetic: runs differing in them can differ with the same code and seed."""


def compute_records(runs: list[RunRecord]) -> list[dict[str, Any] | None]:
    """Each run's summary ``compute`` record; None for a summary written before the record existed."""
    records = [(run.summary or {}).get("compute") for run in runs]
    return [record if isinstance(record, dict) else None for record in records]


def compute_differences(runs: list[RunRecord]) -> list[str]:
    """``entry (value, value, ...)`` for each of :data:`COMPUTE_KEYS` in which the recorded ``runs`` differ."""
    known = [record for record in compute_records(runs) if record is not None]
    found = []
    for key in COMPUTE_KEYS:
        values = sorted({str(record.get(key, "-")) for record in known})
        if len(values) > 1:
            found.append(f"{key} ({', '.join(values)})")
    return found


def unrecorded_runs(runs: list[RunRecord]) -> int:
    """How many of ``runs`` have no compute record while others have one (0 when none or all have it)."""
    records = compute_records(runs)
    missing = sum(record is None for record in records)
    return missing if missing < len(records) else 0


def scores_of(group: Group, metric: str) -> list[float] | None:
    """``metric`` of each of the group's runs; None when one of them has no number for it."""
    scores = [_score(run, metric) for run in group.runs]
    return None if any(score is None for score in scores) else [score for score in scores if score is not None]


def show_only(groups: list[Group], keys: list[str], columns: list[str]) -> list[str]:
    """Keep only ``columns`` of every group's values; they must be differing keys that tell the groups apart."""
    unknown = [column for column in columns if column not in keys]
    if unknown:
        raise SandboxError(f"--columns {','.join(unknown)}: not a key that differs between the runs; they are: {', '.join(keys)}")
    seen: dict[tuple[str, ...], Group] = {}
    for group in groups:
        shown = tuple(_identity(group.values[column]) for column in columns)
        if shown in seen:
            hidden = [key for key in keys if key not in columns and _identity(group.values[key]) != _identity(seen[shown].values[key])]
            raise SandboxError(f"--columns {','.join(columns)}: two groups look alike; add one of {', '.join(hidden)}")
        seen[shown] = group
    for group in groups:
        group.values = {column: group.values[column] for column in columns}
    return list(columns)
