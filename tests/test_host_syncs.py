"""A training step makes the host wait for the device at most once (the non-finite check).

Counted on the CPU with :mod:`host_syncs` (the operators that synchronise on a GPU) over whole
iterations of real runs of the tiny recipe: real batches with padding, some pixels untrusted. On a
GPU (``-m gpu``) CUDA's own detector counts them (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import pytest
import torch

from host_syncs import counting_host_syncs
from sandbox.recipe import load_resolved_recipe
from sandbox.train.log_window import LogWindow
from sandbox.train.loop import start_run

UNIMATCH = [
    "model.mix_bn=false", "model.dropout=0.0", "perturbation.name=dropout", "train.pseudo_labels=student",
    "train.strong_views=2", "train.cutmix_partners=stream", "train.perturbed_view=weak", "train.perturb_at=encoder",
    "train.unsupervised_normalisation=image_pixels", "eval.model=student",
]
METHODS = {
    "ddfp_glow": [],
    "ddfp_gmm": ["density.name=gmm"],
    "none": ["perturbation.name=none"],
    "dropout": ["perturbation.name=dropout"],
    "unimatch": UNIMATCH,
}


def syncs_per_step(recipe_path: Path, method: str, counter: Callable[[], ContextManager[list]]) -> dict[int, list]:
    """Train the tiny recipe with ``method``; what ``counter`` recorded during each iteration, by step."""
    settings = ["train.iters=6", "train.threshold=0.3", "train.log_every=100", "train.eval_every=100",
                "train.checkpoint_every=100", *METHODS[method]]
    recipe, registry = load_resolved_recipe(recipe_path, settings, [])
    trainer = start_run(recipe, registry, resume=False, overwrite=True)
    iteration, counted = trainer.iteration, {}

    def counting(step: int, *batches: object) -> object:
        with counter() as calls:
            result = iteration(step, *batches)
        counted[step] = calls
        return result

    counting.agree_on_teacher = iteration.agree_on_teacher
    trainer.iteration = counting
    trainer.train()
    assert sorted(counted) == list(range(6))
    first = recipe.train.warmup_iters  # the first semi-supervised step initialises (the gmm's moments)
    return {step: calls for step, calls in counted.items() if step > first}


@contextmanager
def counted_host_syncs() -> Iterator[list]:
    with counting_host_syncs() as syncs:
        yield syncs.calls


@pytest.mark.parametrize("method", list(METHODS))
def test_a_training_step_waits_for_the_device_once(tiny_recipe: Path, method: str) -> None:
    for step, calls in syncs_per_step(tiny_recipe, method, counted_host_syncs).items():
        assert len(calls) == 1, f"step {step}: {calls}"
        assert calls[0][0] == "_local_scalar_dense" and "iteration.py" in calls[0][1], calls


@contextmanager
def cuda_sync_warnings() -> Iterator[list]:
    """CUDA's synchronisation warnings raised inside the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            synced: list = []
            yield synced
        finally:
            torch.cuda.set_sync_debug_mode("default")
            synced.extend(str(w.message) for w in caught if "synchronizing" in str(w.message))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", list(METHODS))
def test_a_cuda_training_step_synchronises_once(tiny_recipe: Path, method: str) -> None:
    for step, calls in syncs_per_step(tiny_recipe, method, cuda_sync_warnings).items():
        assert len(calls) == 1, f"step {step}: {calls}"


def test_the_sync_counter_sees_what_synchronises() -> None:
    """It counts scalar reads, data-dependent shapes and copies to the host (it can fail)."""
    values = torch.arange(6.0)
    with counting_host_syncs() as syncs:
        values.sum().item()
        values[values > 2]
        values.nonzero()
        values.tolist()
        torch.where(values > 2, values, 0.0)  # no sync
    assert [name for name, _ in syncs.calls] == ["_local_scalar_dense", "index", "nonzero", "tolist"]


def test_logging_a_step_never_reads_the_device() -> None:
    window = LogWindow()
    with counting_host_syncs() as syncs:
        window.add({"loss": torch.tensor(1.5), "density_nll": torch.tensor(float("nan")), "density_lr": 0.01})
        window.add({"loss": torch.tensor(0.5), "density_nll": torch.tensor(3.0), "density_lr": 0.01})
    assert not syncs.calls, syncs.summary()
    means = window.means()
    assert float(means["loss"]) == 1.0 and float(means["density_nll"]) == 3.0, "a non-finite value is left out"
    assert window.saved() == ({"loss": 2.0, "density_nll": 3.0, "density_lr": pytest.approx(0.02)},
                              {"loss": 2, "density_nll": 1, "density_lr": 2}, 0)
    only_nan = LogWindow()
    only_nan.add({"density_nll": torch.tensor(float("inf"))})
    assert only_nan.means() == {}, "a key whose every value was left out is not logged"
