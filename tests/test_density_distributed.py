"""Every built-in density estimator stays identical on every process, also when one has no pixels.

Two CPU processes (gloo) fit the same estimator on different pixels; a process without pixels at
some steps (the first included, where ``gmm`` initialises from data) contributes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sandbox.density import proportional_shares
from test_distributed import run_gloo_processes

WORKER = '''
import math, os, sys
import torch
import torch.distributed as dist
from sandbox.plugins import load_registry

name, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same construction on every process, as the trainer's seed
estimator = load_registry().get("density", name).build({"sampled_pixels": 64}, feature_dim=6, num_classes=3, total_steps=8)
torch.manual_seed(100 + rank)  # each process's own pixels and sampling noise
nlls = []
for step in range(5):
    empty = rank == 1 and step in (0, 2)
    count = 0 if empty else 40 + 30 * rank
    labels = torch.randint(-1, 3, (count,))
    features = torch.randn(count, 6) + 2.0 * labels.clamp(min=0).unsqueeze(1)
    stats = estimator.fit_step(features, labels)
    nlls.append(stats["nll"])
    flat = torch.cat([p.detach().reshape(-1) for p in estimator.state_dict().values() if p.is_floating_point()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), f"step {step}: the estimators differ across processes"
torch.save({"nll": nlls, "state": estimator.state_dict()}, f"{out}/rank{rank}.pt")
dist.barrier()  # both are done before either tears the group down
dist.destroy_process_group()
os._exit(0)  # skip the interpreter's teardown, where gloo's threads can still abort (exit -6)
'''


@pytest.mark.parametrize("name", ["glow", "nflows", "gmm"])
def test_estimators_stay_identical_across_processes_and_an_empty_process_adds_no_nan(name: str, tmp_path: Path) -> None:
    script = tmp_path / "density_worker.py"
    script.write_text(WORKER)
    run_gloo_processes([sys.executable, str(script), name, str(tmp_path)], 2, tmp_path)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2))
    assert first["nll"] == second["nll"]
    assert all(torch.isfinite(torch.tensor(first["nll"]))), "a process without pixels contributes no NaN"
    if name == "gmm":
        assert bool(first["state"]["initialized"]), "initialised at the first step from the pixels of rank 0 only"


POOLING_WORKER = '''
"""Rank 0 holds 100 pixels, rank 1 holds 10: save the pooled gradient of one fit_step (exact: nothing sampled)
and its mean over 400 independent draws with sampled_pixels = 11 (shares 10 and 1)."""
import copy, os, sys
import torch
import torch.distributed as dist
from sandbox.plugins import load_registry

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
sys.path.insert(0, out)
from pooling_data import build, pixels

features, labels = pixels()
mine = slice(0, 100) if rank == 0 else slice(100, 110)
results = {}
for sampled in (1000, 11):
    base = build(sampled)
    total = None
    repeats = 1 if sampled == 1000 else 400
    for repeat in range(repeats):
        estimator = copy.deepcopy(base)
        torch.manual_seed(1000 * repeat + rank)  # each process's own sampling draw
        estimator.fit_step(features[mine], labels[mine])
        flat = torch.cat([p.grad.reshape(-1) for p in estimator.parameters()])
        total = flat if total is None else total + flat
    results[sampled] = total / repeats
torch.save(results, f"{out}/pooled{rank}.pt")
dist.barrier()
dist.destroy_process_group()
os._exit(0)
'''

POOLING_DATA = '''
import torch
from sandbox.plugins import load_registry


def build(sampled_pixels):
    """The same small glow estimator on every process (no input noise, no clipping)."""
    torch.manual_seed(0)
    options = {"hidden": 8, "sampled_pixels": sampled_pixels, "input_noise": 0.0, "grad_clip": 1e9}
    return load_registry().get("density", "glow").build(options, feature_dim=4, num_classes=3, total_steps=4)


def pixels():
    """110 pixels: the first 100 (rank 0's) unlike the last 10 (rank 1's), labeled and unlabeled."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(110, 4, generator=generator)
    features[100:] += 3.0
    labels = torch.randint(-1, 3, (110,), generator=generator)
    return features, labels
'''


def all_pixel_gradient(tmp_path: Path) -> torch.Tensor:
    """One process's gradient of the mean NLL over all 110 pixels (what the pooled gradient must equal)."""
    sys.path.insert(0, str(tmp_path))
    try:
        from pooling_data import build, pixels
    finally:
        sys.path.remove(str(tmp_path))
    estimator = build(1000)
    features, labels = pixels()
    components, log_det = estimator._scores(features)
    loss = -(estimator.prior.combine(components, labels) + log_det).mean()
    grads = torch.autograd.grad(loss, list(estimator.parameters()), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, estimator.parameters())])


def test_pooled_gradient_is_the_gradient_over_every_process_pixels(tmp_path: Path) -> None:
    """The reviewer's probe: 100 pixels on one process, 10 on the other.

    Nothing sampled (sampled_pixels >= 110): the pooled gradient is one process's gradient over all
    110 pixels. sampled_pixels = 11 (a total: shares 10 and 1): over 400 draws its mean is that
    gradient too (each process's mean weighted by its real count). The former rule, a cap of
    sampled_pixels per process and weights min(count, cap) (11 and 10), is 379% away (checked).
    """
    (tmp_path / "pooling_data.py").write_text(POOLING_DATA)
    script = tmp_path / "pooling_worker.py"
    script.write_text(POOLING_WORKER)
    run_gloo_processes([sys.executable, str(script), str(tmp_path)], 2, tmp_path, "pool")
    first, second = (torch.load(tmp_path / f"pooled{rank}.pt", weights_only=True) for rank in range(2))
    expected = all_pixel_gradient(tmp_path)
    torch.testing.assert_close(first[1000], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second[1000], first[1000], rtol=0, atol=0)
    relative = float((first[11] - expected).norm() / expected.norm())
    assert relative < 0.1, f"the mean pooled gradient over 400 sampled draws is {relative:.1%} away from the all-pixel one"


@pytest.mark.parametrize(
    ("counts", "budget", "shares"),
    [
        ([100, 10], 1000, [100, 10]),  # everything fits: every pixel
        ([100, 10], 11, [10, 1]),
        ([100, 10], 10, [9, 1]),  # 9.09 and 0.91: the remainder goes to the larger fraction
        ([5, 5, 5], 10, [4, 3, 3]),  # ties to the lower rank
        ([0, 40], 20, [0, 20]),
        ([0, 0], 20, [0, 0]),
    ],
)
def test_sampled_pixels_is_a_total_shared_in_proportion_to_the_real_counts(
    counts: list[int], budget: int, shares: list[int]
) -> None:
    assert proportional_shares(counts, budget) == shares
    assert sum(proportional_shares(counts, budget)) == min(sum(counts), budget)
