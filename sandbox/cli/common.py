"""Options and set-up shared by the commands.

Nothing heavy is imported here at module level (the plugin modules and the registry import torch):
every command module imports this one, and ``sandbox compare`` and ``sandbox ablate --list`` must
start without torch.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer

from sandbox.errors import SandboxError

if TYPE_CHECKING:
    from sandbox.recipe import Recipe
    from sandbox.registry import Registry

RecipeArgument = typer.Argument(..., help="Path to a recipe TOML file.", show_default=False)
SetOption = typer.Option(None, "--set", help="Override a recipe key: --set train.iters=50 (repeatable).")
PluginOption = typer.Option(None, "--plugin", help="Extra plugin module or .py file to load (repeatable).")


def load_resolved_recipe(
    path: Path, overrides: Optional[List[str]], plugins: Optional[List[str]]
) -> tuple[Recipe, Registry]:
    """The recipe with overrides applied, ``plugins`` extended by ``--plugin``, components resolved; the registry used.

    The resolved recipe (saved as the run's ``recipe.toml``) thus names every plugin the run used.
    """
    from sandbox.plugins import load_registry
    from sandbox.recipe import load_recipe, resolve_components

    recipe = load_recipe(path, list(overrides or []))
    recipe.plugins = [*recipe.plugins, *(entry for entry in map(as_recipe_plugin, plugins or []) if entry not in recipe.plugins)]
    registry = load_registry(recipe.plugins)
    return resolve_components(recipe, registry, str(path)), registry


def as_recipe_plugin(spec: str) -> str:
    """A ``--plugin`` as the resolved recipe records it: a ``.py`` file by its absolute path (so the
    saved ``recipe.toml`` loads it from anywhere), a module by its name."""
    return str(Path(spec).resolve()) if spec.endswith(".py") else spec


@contextmanager
def writing_to(out: Path, option: str = "--out") -> Iterator[None]:
    """Writes into the output folder ``out``: a place that cannot be written (read-only, a file in
    the way, a full disk) is a one-line error naming the option and the file instead of a traceback."""
    try:
        yield
    except OSError as error:
        where = error.filename or out
        raise SandboxError(f"{option} {out}: cannot write {where}: {error.strerror or error}") from None
