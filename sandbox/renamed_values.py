"""Recipe option values that were renamed: the old names still work, as their current ones.

Imports no torch: ``sandbox compare`` reads saved recipes through it (runs saved before a rename
group with runs saved after it).
"""

from __future__ import annotations

import tomllib
from typing import Any

import tomli_w

RENAMED_VALUES: dict[tuple[str, str], dict[str, str]] = {
    ("train", "unsupervised_normalisation"): {"trusted": "trusted_pixels", "valid": "image_pixels"},
}
"""Option values that were renamed, by ``(table, key)``: old name -> current name (the old one still works)."""


def rename_old_values(data: dict[str, Any]) -> list[str]:
    """Replace old option values (:data:`RENAMED_VALUES`) in raw recipe data by their current names, in
    place; one line per replaced value, saying what it is called now."""
    notes = []
    for (table, key), renames in RENAMED_VALUES.items():
        section = data.get(table)
        old = section.get(key) if isinstance(section, dict) else None
        if isinstance(old, str) and old in renames:
            section[key] = renames[old]
            notes.append(f"{table}.{key} = {old!r} is now called {renames[old]!r}; the old name still works")
    return notes


def with_current_names(saved_toml: str) -> str:
    """A saved recipe's TOML with old option values renamed, so that a run saved before a rename
    equals the same recipe today (``--resume``, ``sandbox ablate``)."""
    data = tomllib.loads(saved_toml)
    return tomli_w.dumps(data) if rename_old_values(data) else saved_toml
