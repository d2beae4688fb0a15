"""A training step makes the host wait for the device at most once (the non-finite check).

Counted on the CPU with :mod:`host_syncs` (the operators that synchronise on a GPU) over whole
iterations of real runs of the tiny recipe: real batches with padding, some pixels untrusted. On a
GPU (``-m gpu``) CUDA's own detector counts them (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import numpy
import pytest
import torch

from host_syncs import counting_host_syncs
from shared_launch import Job, SharedLaunch
from sandbox.host_side import host_side
from sandbox.recipe import load_resolved_recipe
from sandbox.train.log_window import LogWindow
from sandbox.train.loop import start_run
from sandbox.train.step import LabeledBatch, UnlabeledBatch

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
    "ddfp_nflows": ["density.name=nflows"],
}


def syncs_per_step(
    recipe_path: Path, method: str, counter: Callable[[tuple], ContextManager[list]], extra: Sequence[str] = ()
) -> dict[int, list]:
    """Train the tiny recipe with ``method`` (and ``extra`` settings); what ``counter`` recorded during
    each iteration (given the iteration's batches), by step."""
    settings = ["train.iters=6", "train.threshold=0.3", "train.log_every=100", "train.eval_every=100",
                "train.checkpoint_every=100", *METHODS[method], *extra]
    recipe, registry = load_resolved_recipe(recipe_path, settings, [])
    trainer = start_run(recipe, registry, resume=False, overwrite=True)
    iteration, counted = trainer.iteration, {}
    accumulate = iteration.accumulate

    def counting(step: int, micro_batches: list) -> object:
        batches = tuple(batch for micro in micro_batches for batch in (micro.labeled, micro.unlabeled, micro.partners))
        with counter(batches) as calls:
            result = accumulate(step, micro_batches)
        counted[step] = calls
        return result

    iteration.accumulate = counting
    trainer.train()
    assert sorted(counted) == list(range(6))
    first = recipe.train.warmup_iters  # the first semi-supervised step initialises (the gmm's moments)
    return {step: calls for step, calls in counted.items() if step > first}


@contextmanager
def counted_host_syncs(batches: tuple) -> Iterator[list]:
    """:func:`counting_host_syncs` with the batches' device copies marked as device tensors (their
    host copies, ``host_masks`` and ``host_padding``, are the host's)."""
    with counting_host_syncs() as syncs:
        for batch in batches:
            if isinstance(batch, LabeledBatch):
                syncs.mark_device(batch.images, batch.masks)
            elif isinstance(batch, UnlabeledBatch):
                syncs.mark_device(batch.weak, batch.strong, batch.padding, batch.strong2)
        yield syncs.calls


@pytest.mark.parametrize("method", list(METHODS))
def test_a_training_step_waits_for_the_device_once(tiny_recipe: Path, method: str) -> None:
    for step, calls in syncs_per_step(tiny_recipe, method, counted_host_syncs).items():
        assert len(calls) == 1, f"step {step}: {calls}"
        assert calls[0][0] == "item" and "iteration.py" in calls[0][1], calls


TWO_PROCESSES = {
    "ddfp_glow": ["train.sync_bn=true"],
    "ddfp_gmm": [],
    "ddfp_nflows": [],
    "unimatch": ["train.sync_bn=true"],
}
"""The methods counted on 2 processes (every framework and estimator), with extra settings: BatchNorm
synchronised over the processes for one of each framework."""


def count_on_this_process(folder: Path) -> None:
    """Launch job: the syncs of each step of each of :data:`TWO_PROCESSES` on this process, saved to
    ``syncs_rank{i}.json`` as ``{method: {step: [[name, where], ...]}}``."""
    from conftest import write_tiny_recipe

    recipe = write_tiny_recipe(folder)
    counted = {method: syncs_per_step(recipe, method, counted_host_syncs, extra)
               for method, extra in TWO_PROCESSES.items()}
    rank = int(os.environ["RANK"])
    (folder / f"syncs_rank{rank}.json").write_text(json.dumps(counted))
    (folder / f"host_group_rank{rank}.json").write_text(json.dumps(exchange_beside_nccl(rank)))


def exchange_beside_nccl(rank: int) -> dict:
    """The host exchange as a run on NCCL makes it (the backend reported as ``nccl``): a gloo group of its
    own, made once, that sums host numbers; what this process saw."""
    import torch.distributed as dist

    from sandbox.processes import collectives as distributed

    reported = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"
    try:
        first, second = distributed.host_group(), distributed.host_group()
        values = distributed.host_values_of_every_process(10 + rank)
        return {"own_group": first is not None, "made_once": first is second,
                "backend": dist.get_backend_config(first) if first is not None else None, "values": values}
    finally:
        dist.get_backend = reported


LAUNCH_JOBS = {"host_syncs": Job(count_on_this_process, worlds=(2,))}


def test_a_training_step_waits_for_the_device_once_on_two_processes(shared_launch: SharedLaunch) -> None:
    """On several processes too: the estimator's pixel counts are exchanged in host memory, the
    synchronised BatchNorm reads nothing, the non-finite check is agreed on the device."""
    folder = shared_launch.folder("host_syncs", 2)
    for rank in range(2):
        counted = json.loads((folder / f"syncs_rank{rank}.json").read_text())
        assert sorted(counted) == sorted(TWO_PROCESSES)
        for method, steps in counted.items():
            assert steps, method
            for step, calls in steps.items():
                assert len(calls) == 1, f"rank {rank}, {method}, step {step}: {calls}"
                assert calls[0][0] == "item" and "iteration.py" in calls[0][1], calls


def test_on_nccl_the_pixel_counts_go_through_a_gloo_group_made_once(shared_launch: SharedLaunch) -> None:
    folder = shared_launch.folder("host_syncs", 2)
    for rank in range(2):
        seen = json.loads((folder / f"host_group_rank{rank}.json").read_text())
        assert seen["own_group"] and seen["made_once"] and "gloo" in seen["backend"], seen
        assert seen["values"] == [10, 11], seen


@contextmanager
def cuda_sync_warnings(batches: tuple) -> Iterator[list]:
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


@host_side
def host_work(values: torch.Tensor) -> list:
    """Host-side code: free with a host tensor, counted with a device tensor."""
    return (values > 2).nonzero().flatten().tolist()


def test_the_sync_counter_sees_what_synchronises() -> None:
    """It counts scalar reads, data-dependent shapes, copies to the host and device tensors handed to
    host-side code (it can fail); host tensors in host-side code and moves to the run's device are free."""
    host, buffer = torch.arange(6.0), torch.empty(6)
    with counting_host_syncs() as syncs:
        values = host * 1  # made while counting, outside host-side code: a device tensor
        values.sum().item()
        values[values > 2]
        values.nonzero()
        values.tolist()
        values.numpy()
        bool(values[0]), int(values[1]), float(values[2])
        values.cpu()
        values.to("cpu")
        str(values), numpy.asarray(values)
        buffer.copy_(values)  # into host memory
        values.clone().copy_(host)  # from host memory: no wait
        values.to(values.device)  # a move to the run's device (on a GPU: stays there)
        host.cpu()  # a host tensor stays where it is
        torch.where(values > 2, values, 0.0)  # no sync
        assert host_work(host) == [3, 4, 5]
        assert not syncs.calls[14:], syncs.summary()
        host_work(values)
    assert [name for name, _ in syncs.calls] == [
        "item", "index", "nonzero", "tolist", "numpy", "__bool__", "__int__", "__float__", "cpu", "to",
        "__repr__", "__array__", "copy_",
        "device tensor in host-side code: gt", "device tensor in host-side code: nonzero",
        "device tensor in host-side code: flatten", "tolist",
    ]


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
