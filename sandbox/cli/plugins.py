"""``sandbox plugins``: list every registered component."""

from __future__ import annotations

from typing import List, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sandbox.cli.common import PluginOption


def plugins(plugin: Optional[List[str]] = PluginOption) -> None:
    """List registered components: kind, name, provider and description."""
    from sandbox.plugins import load_registry

    registry = load_registry(plugin or [])
    table = Table(title="sandbox plugins")
    for column in ("kind", "name", "provided by", "description"):
        table.add_column(column)
    for component in registry:
        table.add_row(component.kind.name, component.name, component.provider, Text(component.description))  # [tables] as written
    for provider, error in registry.broken.items():
        table.add_row(Text("broken", style="red"), "-", provider, Text(error))
    Console(width=max(Console().width, 120)).print(table)
