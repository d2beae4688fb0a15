"""The embedded benchmark shows unlabeled data helping (slow: two short training runs, minutes on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.cli import main

BENCHMARK = Path(__file__).resolve().parents[1] / "recipes" / "ssl_benchmark.toml"

MARGIN = 5.0
"""mIoU points by which the mean teacher must beat supervised-only training (see the test's docstring)."""


def best_miou(tmp_path: Path, name: str, *overrides: str) -> float:
    """Train ``recipes/ssl_benchmark.toml`` at 400 iterations, seed 0; its best val mIoU in percent."""
    args = ["run", str(BENCHMARK), "--set", f"name={name}", "--set", f"output_dir={tmp_path.as_posix()}", "--set", "train.iters=400"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *(item for override in overrides for item in ("--set", override))])
    assert exit_info.value.code == 0
    return 100 * json.loads((tmp_path / name / "seed0" / "summary.json").read_text())["best_miou"]


@pytest.mark.slow
def test_mean_teacher_beats_supervised_only_on_the_benchmark_at_a_reduced_budget(tmp_path: Path) -> None:
    """Seed 0, 400 iterations (100 supervised warm-up): the mean teacher uses 300 steps of unlabeled images.

    Measured with torch 2.14.1 on 2 CPU cores: supervised only 50.87, mean teacher 62.70 (+11.8).
    At the full budget (600 iterations, seeds 0/1/2) supervised only scored 51.33 +- 2.16 and the
    mean teacher 62.19 +- 2.47: 5 points is about twice the larger seed standard deviation (a
    gap that seed noise alone rarely makes) and less than half the measured one (room for
    numerical differences between builds and machines).
    """
    supervised = best_miou(tmp_path, "supervised", "train.warmup_iters=400")
    mean_teacher = best_miou(tmp_path, "mean-teacher", "perturbation.name=none")
    assert mean_teacher - supervised >= MARGIN, (supervised, mean_teacher)
