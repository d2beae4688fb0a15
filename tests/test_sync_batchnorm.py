"""``train.sync_bn`` on CPU processes: BatchNorm over every process's batch equals one process's BatchNorm
on the concatenated batch (outputs, gradients of parameters and inputs, running statistics)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from sandbox.errors import SandboxError
from sandbox.processes.batchnorm import is_synchronised, synchronise_batchnorm
from shared_launch import Job, SharedLaunch, process_group


def make_model() -> nn.Sequential:
    """Conv, BatchNorm, ReLU, conv, timm BatchNormAct2d, conv, BatchNorm with cumulative averaging."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.ReLU),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, momentum=None),
    )


CASES: dict[str, tuple[tuple[int, int], bool]] = {
    "even": ((3, 3), False),
    "uneven": ((3, 1), False),
    "one_each": ((1, 1), False),
    "empty_process": ((0, 4), False),
    "batch_of_one": ((1, 0), False),
    "channels_last": ((2, 3), True),
}
"""Each case: how many images each of 2 processes holds, and whether model and images are channels_last.
Unequal splits are what tell a count-weighted combination of the processes' statistics from a plain average."""


def make_batch(images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` images of different scales (processes' means differ) and loss weights."""
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn(images, 3, 5, 7, generator=generator) * torch.arange(1, images + 1).view(images, 1, 1, 1) + 2.0
    return batch, torch.randn(images, 4, 5, 7, generator=generator)


def loss_of(output: torch.Tensor, weights: torch.Tensor, world: int, elements: int) -> torch.Tensor:
    """The mean over every process's ``elements``: this process's sum x processes / all elements (DDP averages)."""
    return (output * weights).pow(2).sum() * world / elements


def normalise_this_process_share(folder: Path) -> None:
    """Launch job: for each of :data:`CASES`, three train-mode steps and one eval-mode pass of
    :func:`make_model` on this process's share of the case's batch (one process: the whole batch;
    BatchNorm synchronised on several); saves ``CASE/rank{i}.pt``."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        process_group()
    rank = dist.get_rank() if world > 1 else 0
    for case, (split, channels_last) in CASES.items():
        model = make_model()
        if world > 1:
            synchronise_batchnorm(model, torch.device("cpu"))
        images, weights = make_batch(sum(split))
        if world > 1:
            images, weights = images.split(split)[rank], weights.split(split)[rank]
        elements = sum(split) * 4 * 5 * 7  # every process's output elements
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        images = images.clone().requires_grad_(True)
        outputs = []
        for _ in range(3):  # three train-mode steps: running statistics accumulate
            model.zero_grad()
            output = model(images)
            loss = loss_of(output, weights, world, elements)
            loss.backward()
            outputs.append(output.detach())
            if world > 1:  # as DDP: gradients averaged over processes
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        model.eval()
        evaluated = model(images.detach())
        (folder / case).mkdir(exist_ok=True)
        torch.save({
            "outputs": outputs, "input_grad": images.grad, "evaluated": evaluated.detach(),
            "channels_last": output.is_contiguous(memory_format=torch.channels_last) and len(output) > 1,
            "state": model.state_dict(), "grads": {k: p.grad for k, p in model.named_parameters()},
        }, folder / case / f"rank{rank}.pt")


LAUNCH_JOBS = {"sync_batchnorm": Job(normalise_this_process_share, worlds=(1, 2))}


def rank_results(shared_launch: SharedLaunch, world: int, case: str) -> list[dict]:
    """What each of the ``world`` processes of the launch job saved for ``case``."""
    folder = shared_launch.folder("sync_batchnorm", world) / case
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_normalise_as_one_process_on_the_concatenated_batch(shared_launch: SharedLaunch, case: str) -> None:
    (single,), pair = rank_results(shared_launch, 1, case), rank_results(shared_launch, 2, case)
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
    if CASES[case][1]:
        assert single["channels_last"] and any(r["channels_last"] for r in pair), "the outputs keep channels_last"


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


def test_torch_syncbatchnorm_is_refused_off_cuda_and_an_unknown_class_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(SandboxError, match=r"train.sync_bn_impl = 'torch': .*CUDA.*'cpu'"):
        synchronise_batchnorm(model, torch.device("cpu"), "torch")
    with pytest.raises(SandboxError, match=r"train.sync_bn_impl = 'apex': expected one of sandbox, torch"):
        synchronise_batchnorm(model, torch.device("cpu"), "apex")
    assert type(model[1]) is nn.BatchNorm2d, "a refused conversion leaves the model as it was"
