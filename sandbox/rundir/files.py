"""The files of a run directory: their names, strict JSON, the provenance record and the ``FAILED`` marker
(no heavy imports: ``sandbox compare`` reads them)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

RECIPE_FILE = "recipe.toml"
"""The resolved recipe, written when the run starts."""

METRICS_FILE = "metrics.jsonl"
"""One JSON record per logged step and per evaluation."""

SUMMARY_FILE = "summary.json"
"""Written when the run finishes."""

PROVENANCE_FILE = "provenance.json"
"""Where each component of the run came from (built-in, entry point or ``--plugin``), written when it starts."""

FAILED_MARKER = "FAILED"
"""Written by ``sandbox ablate`` when the run raised; holds the error line."""

CLAIM_FILE = "CLAIM"
"""Held by the ``sandbox ablate`` process training the run (see :mod:`sandbox.rundir.claims`)."""


def is_claim_file(name: str) -> bool:
    """Whether a file of a run directory belongs to its claim (``CLAIM``, ``CLAIM.*``, a claim's temporary
    ``.CLAIM.tmp.*``): not the run's content."""
    return name == CLAIM_FILE or name.startswith(CLAIM_FILE + ".") or name.startswith(f".{CLAIM_FILE}.")


def flatten_keys(data: dict, prefix: str = "") -> dict:
    """Nested tables to dotted keys: ``{"train": {"iters": 5}}`` -> ``{"train.iters": 5}``."""
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) inside it replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def strict_json(value: Any, indent: int | None = None) -> str:
    """``value`` as strict JSON (RFC 8259, which strict parsers such as ``jq`` and JavaScript's
    ``JSON.parse`` require): a non-finite float (NaN, inf) is written as ``null``, never as ``NaN``
    or ``Infinity``. Every JSON file and document the project writes goes through it; readers take
    ``null`` as "no value"."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object and None, or None and why it could not be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return None, f"{path.name} could not be read: {error}"
    if not isinstance(data, dict):
        return None, f"{path.name} holds no JSON object"
    return data, None


def read_provenance(path: Path) -> dict[str, dict[str, Any]] | None:
    """The components recorded in ``provenance.json`` of the run directory ``path``, by recipe table
    (``{"perturbation": {"kind": ..., "name": ..., "source": ..., ...}}``); None when the run has no
    readable record (started before runs recorded it, or damaged)."""
    data, problem = read_json_object(path / PROVENANCE_FILE) if (path / PROVENANCE_FILE).is_file() else (None, "missing")
    components = (data or {}).get("components")
    if problem is not None or not isinstance(components, dict):
        return None
    return {table: entry for table, entry in components.items() if isinstance(entry, dict)}


def write_failure(path: Path, message: str) -> None:
    """Mark ``path`` as a failed run with the one-line ``message``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / FAILED_MARKER).write_text(message.strip() + "\n")


def clear_failure(path: Path) -> None:
    """Remove a ``FAILED`` marker before the run is tried again."""
    (path / FAILED_MARKER).unlink(missing_ok=True)
