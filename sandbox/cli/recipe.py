"""``sandbox recipe show``: print a resolved recipe with every default filled in."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sandbox.cli.common import PluginOption, RecipeArgument, SetOption
from sandbox.recipe import load_resolved_recipe

app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)


@app.command("show")
def show(recipe: Path = RecipeArgument, set_: Optional[List[str]] = SetOption, plugin: Optional[List[str]] = PluginOption) -> None:
    """Print the resolved recipe (overrides applied, every default filled in) as TOML."""
    resolved, _ = load_resolved_recipe(recipe, set_, plugin)
    typer.echo(resolved.to_toml(), nl=False)
