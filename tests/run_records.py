"""Reading a run's metrics records and comparing two runs (shared by the test modules)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def records(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(first: list[dict], second: list[dict]) -> None:
    """The same steps and keys with equal values (floats to 1e-5; ``images_per_s`` is a timing)."""
    assert [r["step"] for r in first] == [r["step"] for r in second]
    for a, b in zip(first, second):
        assert set(a) == set(b), a["step"]
        for key in a:
            if isinstance(a[key], str):
                assert a[key] == b[key], (a["step"], key)
            elif key != "images_per_s":
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Equal metrics (all keys but ``images_per_s``) and equal ``last.pt`` weights."""
    assert_same_records(records(reference), records(resumed))
    expected = torch.load(reference / "last.pt", weights_only=True)["model"]
    actual = torch.load(resumed / "last.pt", weights_only=True)["model"]
    assert expected.keys() == actual.keys()
    assert all(torch.allclose(actual[k].float(), expected[k].float(), atol=1e-5) for k in expected)
