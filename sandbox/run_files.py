"""The names of the files in a run directory (no heavy imports: ``sandbox compare`` reads them)."""

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
"""Held by the ``sandbox ablate`` process training the run (see :mod:`sandbox.sweep.claims`)."""


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
