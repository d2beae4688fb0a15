"""Every built-in density estimator stays identical on every process, also when one has no pixels.

Two CPU processes (gloo) fit the same estimator on different pixels; a process without pixels at
some steps (the first included, where ``gmm`` initialises from data) contributes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from test_distributed import finish, free_port, launch_env, start

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
    port = free_port()
    processes, logs = [], []
    for rank in range(2):
        env = {**launch_env(tmp_path), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"}
        logs.append(tmp_path / f"rank{rank}.log")
        processes.append(start([sys.executable, str(script), name, str(tmp_path)], env, logs[-1]))
    finish(processes, logs)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2))
    assert first["nll"] == second["nll"]
    assert all(torch.isfinite(torch.tensor(first["nll"]))), "a process without pixels contributes no NaN"
    if name == "gmm":
        assert bool(first["state"]["initialized"]), "initialised at the first step from the pixels of rank 0 only"
