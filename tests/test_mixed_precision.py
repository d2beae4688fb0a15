"""fp16 with gradient scaling, run on the CPU: the code path a GPU runs, only the device differs.

On a GPU, ``train.mixed_precision = "fp16"`` makes Accelerate autocast to float16 and scale the
loss with torch.amp's ``GradScaler``: ``accelerator.backward`` scales, the prepared optimizer
unscales before it steps and skips the step when a gradient overflowed, and the training iteration
reads that skip (no EMA update, ``skipped_updates`` counted). On a CPU Accelerate makes no scaler
(a recipe's fp16 trains in float32 there, with a warning), so these tests give the CPU Accelerator
what a GPU one gets, torch.amp's float16 autocast and ``GradScaler("cpu")``, and run the project's
unchanged training loop through it. The density estimator trains in float32 under autocast, with
its own optimizer and unscaled gradients (clipped by their true norm). The student has no gradient
clipping of its own.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from accelerate.state import AcceleratorState

import sandbox.train.loop as loop_module
from run_records import records
from sandbox.plugins import load_registry
from sandbox.recipe import load_recipe, resolve_components
from sandbox.train.accelerator import effective_precision, make_accelerator
from sandbox.train.loop import Trainer, start_run
from sandbox.train.student_pass import network_of


pytestmark = pytest.mark.skipif(
    not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler('cpu') and CPU float16 autocast need torch >= 2.3"
)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """fp16 here, other precisions in other tests of the same worker."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def fp16_trainer(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, scaler: dict[str, float], overrides: list[str]) -> Trainer:
    """A trainer of the tiny recipe in fp16 whose CPU Accelerator has what a GPU one has: float16
    autocast and torch.amp's GradScaler, made with ``scaler`` (its keyword arguments)."""

    def with_scaler(*args: Any, **kwargs: Any) -> Any:
        accelerator = make_accelerator(*args, **kwargs)
        assert accelerator.scaler is None, "Accelerate scales fp16 on a CPU itself now: test its own scaler"
        accelerator.scaler = torch.amp.GradScaler("cpu", **scaler)
        accelerator.native_amp = True
        return accelerator

    monkeypatch.setattr(loop_module, "make_accelerator", with_scaler)
    recipe = resolve_components(load_recipe(tiny_recipe, ["train.mixed_precision=fp16", *overrides]), load_registry())
    return start_run(recipe, load_registry(), resume=False, overwrite=True)


def student_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The student's floating parameters and buffers, copied."""
    student = network_of(trainer.accelerator.unwrap_model(trainer.model))
    return {k: v.detach().clone() for k, v in student.state_dict().items() if v.is_floating_point()}


def test_fp16_autocasts_the_student_to_float16_and_the_density_estimator_stays_float32(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = fp16_trainer(tiny_recipe, monkeypatch, {"init_scale": 2.0**8}, ["train.iters=5"])
    assert effective_precision(trainer.accelerator) == "fp16"
    student = network_of(trainer.accelerator.unwrap_model(trainer.model))
    dtypes: set[torch.dtype] = set()
    hook = student.classifier.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    density = trainer.method.density
    assert density is not None
    before = {k: v.clone() for k, v in density.state_dict().items()}
    scored: set[torch.dtype] = set()
    component_scores = density.component_scores

    def recorded(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        components, log_det = component_scores(features)
        scored.update({features.dtype, components.dtype, torch.as_tensor(log_det).dtype})
        return components, log_det

    monkeypatch.setattr(density, "component_scores", recorded)
    summary = trainer.train()
    hook.remove()
    assert torch.float16 in dtypes, "the student computes in float16 under autocast"
    assert scored == {torch.float32}, "the estimator scores in float32 under the student's autocast"
    changed = [k for k, v in density.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "the density estimator trained (float32, its own optimizer, unscaled gradients)"
    assert summary["skipped_updates"] == 0 and summary["mixed_precision"] == "fp16"
    nll = [r["density_nll"] for r in records(trainer.run_dir.path) if "density_nll" in r]
    assert nll and all(math.isfinite(v) for v in nll)


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scale 2^40 overflows float16 gradients: the step is skipped (no update, counted) and the scale
    divided by 2^10, until the gradients fit; then the model trains."""
    scaler = {"init_scale": 2.0**40, "backoff_factor": 2.0**-10}
    trainer = fp16_trainer(tiny_recipe, monkeypatch, scaler, ["train.iters=6", "train.log_every=1"])
    start = student_state(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = trainer.train()
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], "a skipped step advances the schedule quietly"
    final_scale = trainer.accelerator.scaler.get_scale()
    backoffs = round(math.log2(2.0**40 / final_scale) / 10)
    assert 1 <= backoffs < 6, f"scale {final_scale}"
    assert summary["skipped_updates"] == backoffs, "every backoff is one skipped step, counted"
    logged = [r for r in records(trainer.run_dir.path) if "skipped_updates" in r]
    assert [r["skipped_updates"] for r in logged][:backoffs] == list(range(1, backoffs + 1)), "the first steps"
    after = student_state(trainer)
    assert any(not torch.equal(after[k], start[k]) for k in start), "after the backoff the steps update"
    assert all(torch.isfinite(v).all() for v in after.values())


def test_the_optimizer_steps_with_unscaled_gradients(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two supervised steps scaled by 2^4 and by 2^12 move the parameters alike: the gradients were
    scaled for the backward pass and unscaled before the update (an update of scaled gradients
    would differ 256-fold)."""
    updates = []
    for scale in (2.0**4, 2.0**12):
        AcceleratorState._reset_state()
        trainer = fp16_trainer(tiny_recipe, monkeypatch, {"init_scale": scale}, ["train.iters=2", "train.warmup_iters=2"])
        start = student_state(trainer)
        assert trainer.train()["skipped_updates"] == 0
        after = student_state(trainer)
        updates.append(torch.cat([(after[k] - start[k]).flatten() for k in start if "running" not in k]))
    moved = float(updates[0].norm())
    assert moved > 0
    assert float((updates[1] - updates[0]).norm()) < 0.05 * moved, "the update does not depend on the scale"
