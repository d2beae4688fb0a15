"""Options and set-up shared by the commands."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sandbox.plugins import load_registry
from sandbox.recipe import Recipe, load_recipe, resolve_components
from sandbox.registry import Registry

RecipeArgument = typer.Argument(..., help="Path to a recipe TOML file.", show_default=False)
SetOption = typer.Option(None, "--set", help="Override a recipe key: --set train.iters=50 (repeatable).")
PluginOption = typer.Option(None, "--plugin", help="Extra plugin module or .py file to load (repeatable).")


def load_resolved_recipe(
    path: Path, overrides: Optional[List[str]], plugins: Optional[List[str]]
) -> tuple[Recipe, Registry]:
    """The recipe with overrides applied and components resolved, and the registry used."""
    recipe = load_recipe(path, list(overrides or []))
    registry = load_registry([*recipe.plugins, *(plugins or [])])
    return resolve_components(recipe, registry, str(path)), registry
