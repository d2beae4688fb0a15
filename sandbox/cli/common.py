"""Options and set-up shared by the commands.

Nothing heavy is imported here at module level (the plugin modules and the registry import torch):
every command module imports this one, and ``sandbox compare`` and ``sandbox ablate --list`` must
start without torch.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from sandbox.errors import SandboxError

RecipeArgument = typer.Argument(..., help="Path to a recipe TOML file.", show_default=False)
SetOption = typer.Option(None, "--set", help="Override a recipe key: --set train.iters=50 (repeatable).")


def once_each(plugins: Optional[List[str]]) -> Optional[List[str]]:
    """The ``--plugin`` values without repeats (``x.py`` and ``./x.py`` are one file): a plugin given
    twice is loaded, and recorded in the run's recipe, once."""
    if not plugins:
        return plugins
    from sandbox.recipe import as_recipe_plugin

    first: dict[str, str] = {}
    for spec in plugins:
        first.setdefault(as_recipe_plugin(spec), spec)
    return list(first.values())


PluginOption = typer.Option(
    None, "--plugin", callback=once_each, help="Extra plugin module or .py file to load (repeatable)."
)


@contextmanager
def writing_to(out: Path, option: str = "--out") -> Iterator[None]:
    """Writes into the output folder ``out``: a place that cannot be written (read-only, a file in
    the way, a full disk) is a one-line error naming the option and the file instead of a traceback."""
    try:
        yield
    except OSError as error:
        where = error.filename or out
        raise SandboxError(f"{option} {out}: cannot write {where}: {error.strerror or error}") from None
