"""Checks that need a CUDA device: mixed precision, compile and channels_last runs of the paper's
networks on generated data, and their peak memory (printed; run with ``-s`` to see it).

Marked ``gpu`` and skipped without CUDA: ``pytest -m gpu -s tests/test_gpu.py``.
``benchmarks/gpu_check.sh`` runs them, and its CPU dry run (``GPU_CHECK_DRY=1``) runs them on the
CPU at tiny sizes (``SANDBOX_GPU_TESTS_ON_CPU=1``), to check the tests themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from sandbox.cli import main

ON_CPU = os.environ.get("SANDBOX_GPU_TESTS_ON_CPU") == "1"
"""Dry run: the same tests on a CPU at tiny sizes, on ResNet-18 (fp16 then trains in float32, as on any CPU)."""

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA device"),
]

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CROP, IMAGE, BATCH = (33, 40, 2) if ON_CPU else (321, 360, 4)

GENERATED = [
    "dataset.name=shapes",  # the recipes' Pascal VOC replaced by the embedded generated dataset
    "dataset.num_labeled=16",
    "dataset.num_unlabeled=32",
    "dataset.num_val=4",
    f"dataset.image_size={IMAGE}",
    "backbone.weights=none",
    "eval.mode=whole",
    "train.num_workers=0",
    f"train.crop_size={CROP}",
    f"train.batch_size={BATCH}",
    f"train.unlabeled_batch_size={BATCH}",
    f"train.total_batch_size={2 * BATCH}",  # one process accumulates two micro-batches (fp16: one scaler across them)
    "train.threshold=0.0",  # every pixel trusted: the perturbed view and the density estimator run
]
if ON_CPU:
    GENERATED.append("backbone.model=resnet18")  # the dry run checks the tests, not the network
SHORT = [
    "train.iters=4",
    "train.warmup_iters=2",
    "train.perturbation_start_iters=2",
    "train.log_every=1",
    "train.eval_every=4",
    "train.checkpoint_every=4",
]


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    """Each run picks its own mixed precision; peak memory counts from the start of each test."""
    AcceleratorState._reset_state()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    yield
    AcceleratorState._reset_state()
    torch._dynamo.reset()


def train(recipe: str, overrides: list[str], tmp_path: Path, label: str) -> dict:
    """Run ``recipe`` with ``overrides`` under ``tmp_path``; print its peak memory; its summary and records."""
    sets = [part for override in [*overrides, f"output_dir={tmp_path.as_posix()}"] for part in ("--set", override)]
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(RECIPES / recipe), *sets])
    assert exit_info.value.code == 0, f"{label}: sandbox run failed"
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else "-"
    print(f"\npeak memory: {label}: {peak}")
    run = next(tmp_path.glob("*/seed*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((run / "summary.json").read_text()), "records": records}


def assert_trained(result: dict, precision: str) -> None:
    summary, losses = result["summary"], [r["loss"] for r in result["records"] if "loss" in r]
    expected = precision if torch.cuda.is_available() or precision == "bf16" else "no"
    assert summary["mixed_precision"] == expected
    assert summary["accumulation_steps"] == 2 and summary["total_batch_size"] == 2 * BATCH
    assert losses and all(loss == loss and abs(loss) < float("inf") for loss in losses), losses
    assert any("loss_perturbed" in r for r in result["records"]), "DDFP's perturbed view ran"
    assert 0.0 <= summary["final_miou"] <= 1.0


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_ddfp_pascal_network_trains_in_mixed_precision(precision: str, tmp_path: Path) -> None:
    """fp16 (with Accelerate's gradient scaling: an overflowing first step may be skipped) and bf16."""
    result = train("ddfp_pascal.toml", [*GENERATED, *SHORT, f"train.mixed_precision={precision}"], tmp_path, precision)
    assert_trained(result, precision)
    assert result["summary"]["skipped_updates"] < result["summary"]["iters"]


@pytest.mark.parametrize("lever", ["train.channels_last=true", "train.compile=true"])
def test_ddfp_pascal_network_trains_with_a_speed_lever(lever: str, tmp_path: Path) -> None:
    result = train("ddfp_pascal.toml", [*GENERATED, *SHORT, "train.mixed_precision=bf16", lever], tmp_path, lever)
    assert_trained(result, "bf16")


def test_unimatch_pascal_trains_two_steps(tmp_path: Path) -> None:
    overrides = [*GENERATED, "train.iters=2", "train.warmup_iters=0", "train.log_every=1", "train.eval_every=2",
                 "train.checkpoint_every=2"]
    result = train("unimatch_pascal.toml", overrides, tmp_path, "unimatch 2 steps")
    records = [r for r in result["records"] if "loss" in r]
    assert records and all("loss_perturbed" in r for r in records), "UniMatch's perturbed weak view ran"
    assert result["summary"]["iters"] == 2
