"""``train.sync_bn`` on CPU processes: BatchNorm over every process's batch equals one process's BatchNorm
on the concatenated batch (outputs, gradients of parameters and inputs, running statistics)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from sandbox.errors import SandboxError
from sandbox.train.sync_batchnorm import is_synchronised, synchronise_batchnorm
from test_distributed import run_gloo_processes

WORKER = '''
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from sync_bn_model import make_model, make_batch, loss_of
from sandbox.train.sync_batchnorm import synchronise_batchnorm

out = sys.argv[1]
distributed = "WORLD_SIZE" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
model = make_model()
if distributed:
    synchronise_batchnorm(model, torch.device("cpu"))
images, weights = make_batch()
images = images.chunk(world)[rank].clone().requires_grad_(True)
weights = weights.chunk(world)[rank]
outputs = []
for step in range(3):  # three train-mode steps: running statistics accumulate
    model.zero_grad()
    output = model(images)
    loss = loss_of(output, weights, world)
    loss.backward()
    outputs.append(output.detach())
    if distributed:  # as DDP: gradients averaged over processes
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
model.eval()
evaluated = model(images.detach())
torch.save({
    "outputs": outputs, "input_grad": images.grad, "evaluated": evaluated.detach(),
    "state": model.state_dict(), "grads": {k: p.grad for k, p in model.named_parameters()},
}, f"{out}/rank{rank}.pt")
if distributed:
    dist.barrier()
    dist.destroy_process_group()
os._exit(0)
'''

MODEL = '''
import torch
from torch import nn
from timm.layers import BatchNormAct2d


def make_model():
    """Conv, BatchNorm, ReLU, conv, timm BatchNormAct2d, conv, BatchNorm with cumulative averaging."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.ReLU),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, momentum=None),
    )


def make_batch():
    """Six images of different scales (processes' means differ) and loss weights."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 5, 7, generator=generator) * torch.arange(1, 7).view(6, 1, 1, 1) + 2.0
    return images, torch.randn(6, 4, 5, 7, generator=generator)


def loss_of(output, weights, world):
    """The mean over every process's elements: this process's sum x processes / all elements."""
    return (output * weights).pow(2).sum() * world / (output.numel() * world)
'''


def run_workers(tmp_path: Path, world: int) -> list[dict]:
    """Run the worker on ``world`` gloo processes (1: no process group) and load each rank's results."""
    (tmp_path / "sync_bn_model.py").write_text(MODEL)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"world{world}"
    out.mkdir()
    run_gloo_processes([sys.executable, str(script), str(out), str(tmp_path)], world, out)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def test_two_processes_normalise_as_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    (single,), pair = run_workers(tmp_path, 1), run_workers(tmp_path, 2)
    close = dict(rtol=1e-4, atol=1e-5)
    for step in range(3):
        torch.testing.assert_close(torch.cat([r["outputs"][step] for r in pair]), single["outputs"][step], **close)
    # each process's loss is its share x processes (DDP averages parameter gradients, not input gradients)
    torch.testing.assert_close(torch.cat([r["input_grad"] / 2 for r in pair]), single["input_grad"], **close)
    torch.testing.assert_close(torch.cat([r["evaluated"] for r in pair]), single["evaluated"], **close)
    for rank in pair:
        for key, value in single["state"].items():
            torch.testing.assert_close(rank["state"][key], value, **close, msg=f"buffer or parameter {key}")
        for key, value in single["grads"].items():
            torch.testing.assert_close(rank["grads"][key], value, **close, msg=f"gradient of {key}")
    assert int(pair[0]["state"]["1.num_batches_tracked"]) == 3


def test_conversion_keeps_parameters_keys_and_plain_behaviour_on_one_process() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), BatchNormAct2d(4, act_layer=nn.ReLU))
    reference = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), BatchNormAct2d(4, act_layer=nn.ReLU))
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    converted = synchronise_batchnorm(model, torch.device("cpu"))
    assert converted is model and list(model.state_dict()) == keys and is_synchronised(model)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[2], BatchNormAct2d)
    images = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)  # one process: BatchNorm itself
    assert (model(images) >= 0).all(), "the activation of timm's BatchNormAct2d is kept"


def test_a_batchnorm_with_its_own_forward_is_refused_by_name() -> None:
    class Custom(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    with pytest.raises(SandboxError, match=r"train.sync_bn: 1 is a .*Custom"):
        synchronise_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), Custom(4)), torch.device("cpu"))
