"""Ablation grids: parse ``--grid KEY=V1,V2,...`` and ``--seeds``, expand the combinations, name their folders.

A combination is one value per grid key, applied as ``--set`` overrides after the user's own.
Component ``name`` keys are applied first, so that a plugin's options land on the plugin the
combination chose. An option the chosen plugin does not take (``perturbation.eps`` for
``perturbation.name=none``) is dropped from that combination, and combinations that become
identical run once. Each combination trains into ``<folder>/<label>/seed<k>/`` where the label
is ``key=value,...`` and the folder is :func:`ablation_folder`.

The plugin registry (its plugins import torch) is loaded only when a grid option must be checked
against the plugin a combination chose: a grid of component names alone is expanded without it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sandbox.errors import SandboxError
from sandbox.recipe import MAX_SEED, load_recipe, name_max, parse_override, shortened

if TYPE_CHECKING:
    from sandbox.recipe import Recipe
    from sandbox.registry import Registry

ABLATIONS_FOLDER = "ablations"
"""Default home of sweeps, inside the recipe's ``output_dir``."""

PROTECTED_KEYS = {
    "seed": "use --seeds for seeds, e.g. --seeds 0,1,2",
    "name": "each run is named by its combination, <--output>/<recipe name>/<key=value,...>/seed<k>; "
            "use --set name=... to name the sweep's folder",
    "output_dir": "use --output DIR for the sweep's folder",
}
"""Keys the sweep sets itself, with the option that chooses each instead."""

BASE_LABEL = "base"
"""The label of the single combination of an empty grid."""

UNSAFE_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._=,+-]")
"""Characters replaced by ``_`` in run folder names."""

_OPENING, _CLOSING, _QUOTES = "[{", "]}", "\"'"


@dataclass(frozen=True)
class Axis:
    """One ``--grid`` option: a dotted recipe key and the raw texts of its values."""

    key: str
    values: tuple[str, ...]


def ablation_folder(recipe: Recipe, output: Path | None) -> Path:
    """``<output or output_dir/ablations>/<recipe name>``."""
    return (output or Path(recipe.output_dir) / ABLATIONS_FOLDER) / recipe.name


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes: ``1,[2,3],"a,b"`` -> 3 values."""
    values, current, depth, quote = [], "", 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in _QUOTES:
            quote = char
        elif char in _OPENING:
            depth += 1
        elif char in _CLOSING:
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values


def parse_grid(text: str) -> Axis:
    """``"perturbation.eps=2,4"`` -> ``Axis("perturbation.eps", ("2", "4"))``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    values = split_values(raw) if sep else []
    if not key or not values or any(not value for value in values):
        raise SandboxError(f"--grid {text!r}: expected KEY=VALUE1,VALUE2,..., e.g. --grid perturbation.eps=2,4")
    if key in PROTECTED_KEYS:
        raise SandboxError(f"--grid {text!r}: the sweep sets {key!r} itself ({PROTECTED_KEYS[key]})")
    repeated = first_repeat(values)
    if repeated is not None:
        raise SandboxError(f"--grid {text!r}: the value {repeated} is listed twice; each value runs once")
    return Axis(key, tuple(values))


def first_repeat(items: list[Any]) -> Any | None:
    """The first item that occurs a second time in ``items``; None when all differ."""
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def set_by_the_grid(overrides: list[str], axes: list[Axis]) -> None:
    """Refuse a ``--set`` of a key that a ``--grid`` also sets (the grid's values, applied after it,
    would replace it in every run): the same key, or an inline table of one holding the other's key
    (``--set 'train={lr=0.1}'`` and ``--grid train.lr=...``)."""
    for text in overrides:
        path, value = parse_override(text)
        for axis in axes:
            key = axis.key.split(".")
            values = [parse_override(f"{axis.key}={raw}")[1] for raw in axis.values]
            if (key[:len(path)] == path and holds(value, key[len(path):])) or (
                path[:len(key)] == key and any(holds(grid_value, path[len(key):]) for grid_value in values)
            ):
                both = ".".join(max(key, path, key=len))
                raise SandboxError(
                    f"--set {text!r} and --grid {axis.key}={','.join(axis.values)} both set {both}: the grid's values "
                    "would replace the --set one in every run; drop one of them"
                )


def holds(value: Any, keys: list[str]) -> bool:
    """Whether ``value``'s nested tables hold the key path ``keys`` (any value holds the empty path)."""
    for part in keys:
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def check_run_folder_names(combinations: list[Combination], folder: Path) -> None:
    """Refuse a combination whose run folder name (its label) is longer than the file system of the
    sweep's ``folder`` takes."""
    limit = name_max(folder)
    for combination in combinations:
        size = len(combination.label.encode())
        if size > limit:
            raise SandboxError(
                f"--grid: the run folder name {shortened(combination.label)!r} is {size} bytes, more than the {limit} "
                f"a folder name may have on the file system of {folder}; use shorter values or fewer --grid keys"
            )


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise SandboxError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise SandboxError(f"--seeds {text!r}: seed {seed} is out of range; expected integers from 0 to {MAX_SEED}")
    repeated = first_repeat(seeds)
    if repeated is not None:
        raise SandboxError(f"--seeds {text!r}: seed {repeated} is listed twice; each seed runs once")
    return seeds


@dataclass(frozen=True)
class Combination:
    """One value per grid key, in the order the overrides are applied."""

    settings: tuple[tuple[str, str], ...]

    @property
    def overrides(self) -> list[str]:
        """The settings as ``--set`` texts."""
        return [f"{key}={value}" for key, value in self.settings]

    @property
    def label(self) -> str:
        """The run folder name: ``key=value,...`` (unsafe characters as ``_``), or ``base``."""
        return UNSAFE_LABEL_CHARS.sub("_", ",".join(self.overrides)) or BASE_LABEL


def expand(axes: list[Axis]) -> list[Combination]:
    """Every combination of the axes' values; component ``name`` keys are applied first."""
    repeated = first_repeat([axis.key for axis in axes])
    if repeated is not None:
        raise SandboxError(f"--grid {repeated} is given twice; list all its values in one --grid")
    ordered = sorted(axes, key=lambda axis: not axis.key.endswith(".name"))
    return [
        Combination(tuple(zip((axis.key for axis in ordered), values)))
        for values in itertools.product(*(axis.values for axis in ordered))
    ]


def drop_inapplicable(
    recipe_path: Path, overrides: list[str], combination: Combination, registry: Callable[[], Registry]
) -> tuple[Combination, list[str]]:
    """The combination without options that its chosen plugins do not take, and a note for each.

    ``registry`` gives the plugin registry; it is called only for a combination that sets an option.
    """
    names = [f"{key}={value}" for key, value in combination.settings if key.endswith(".name")]
    try:
        specs = load_recipe(recipe_path, [*overrides, *names]).component_specs()
    except SandboxError:
        return combination, []  # the run reports the error itself
    kept, notes = [], []
    for key, value in combination.settings:
        table, _, option = key.rpartition(".")
        if table in specs and option != "name":
            kind, spec = specs[table]
            components = registry()  # outside the try: a plugin that fails to load is an error here
            try:
                accepted = components.get(kind, spec.name).option_names()
            except SandboxError:
                accepted = [option]  # an unknown plugin: the run reports it
            if option not in accepted:
                notes.append(f"{key} does not apply to {kind} {spec.name!r}: dropped for that combination")
                continue
        kept.append((key, value))
    return Combination(tuple(kept)), notes


def unused_reason(
    recipe_path: Path, overrides: list[str], axes: list[Axis], key: str, registry: Callable[[], Registry]
) -> str:
    """Why no combination takes the option ``key``: the plugins the grid chooses and their options."""
    table, _, option = key.rpartition(".")
    names = [axis for axis in axes if axis.key == f"{table}.name"]
    choices = [[f"{table}.name={value}"] for value in names[0].values] if names else [[]]
    described = []
    for choice in choices:
        kind, spec = load_recipe(recipe_path, [*overrides, *choice]).component_specs()[table]
        valid = ", ".join(registry().get(kind, spec.name).option_names()) or "none"
        described.append(f"{kind} {spec.name!r} (valid options: {valid})")
    return f"unknown option {option!r} for " + "; ".join(dict.fromkeys(described))


def applicable_combinations(
    recipe_path: Path, overrides: list[str], axes: list[Axis], registry: Callable[[], Registry]
) -> tuple[list[Combination], list[str]]:
    """:func:`expand`, minus inapplicable options, each distinct combination once; plus the notes.

    An option that no combination's plugin takes (a typo: ``--grid perturbation.epz=1,2``) is an
    error, as it is in ``--set``; one that only some take is dropped from the others, with a note.
    ``registry`` gives the plugin registry (called only when a grid option must be checked; it
    may be called more than once, so it should return a cached registry).
    """
    combinations: dict[Combination, None] = {}
    notes: dict[str, None] = {}
    used: set[str] = set()
    for combination in expand(axes):
        kept, dropped = drop_inapplicable(recipe_path, overrides, combination, registry)
        combinations.setdefault(kept)
        notes.update(dict.fromkeys(dropped))
        used.update(key for key, _ in kept.settings)
    unused = [axis.key for axis in axes if axis.key not in used]
    if unused:
        raise SandboxError(f"--grid {unused[0]}: {unused_reason(recipe_path, overrides, axes, unused[0], registry)}")
    clash = first_repeat([combination.label for combination in combinations])
    if clash is not None:
        raise SandboxError(f"--grid: two combinations share the folder name {clash!r}; use simpler values")
    twins = same_recipe(recipe_path, overrides, list(combinations))
    if twins is not None:
        first, second = twins
        raise SandboxError(
            f"--grid: {first.label!r} and {second.label!r} give the same recipe (one value written two ways); "
            "list each value once"
        )
    return list(combinations), list(notes)


def same_recipe(
    recipe_path: Path, overrides: list[str], combinations: list[Combination]
) -> tuple[Combination, Combination] | None:
    """The first two combinations whose recipes are equal (``eps=2`` and ``eps=2.0``); None when all differ.

    A combination whose recipe does not load is left out: its run reports the error itself.
    """
    seen: list[tuple[Recipe, Combination]] = []
    for combination in combinations:
        try:
            recipe = load_recipe(recipe_path, [*overrides, *combination.overrides])
        except SandboxError:
            continue
        for earlier, twin in seen:
            if earlier == recipe:
                return twin, combination
        seen.append((recipe, combination))
    return None
