"""The two BatchNorm synchronisations of ``train.sync_bn_impl`` on one device, compared (a benchmark).

Run on 2 processes sharing one GPU (gloo: NCCL refuses two ranks on one device), e.g. by
``benchmarks/gpu_check.sh``::

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/batchnorm_classes.py \\
        recipes/ddfp_pascal.toml --set backbone.weights=none --crop 513 --batch 4

Each process builds the recipe's network with the same weights and draws its own images; each
class (the project's ``sandbox``, torch's ``torch`` on CUDA) then runs train-mode steps (forward,
a loss, backward) of a copy of that network with its BatchNorms synchronised over both processes.
The reference is what they stand for: one process's plain BatchNorm network on the concatenated
batch (computed on each process). The main process prints one row per class: the median ms per
step, the host-device synchronisations of one step (``torch.cuda.set_sync_debug_mode``, which does
not see the waits inside torch.distributed, gloo's staging of CUDA tensors through host memory
included), and the largest difference of its logits and of its gradients (summed over the
processes, as DDP would) from the reference's, relative to their norms. The exit status is 1 when
a class differs by more than :data:`TOLERANCE`. On a CPU (a dry run) only the ``sandbox`` class
runs and no synchronisation is counted. Timings with gloo between two processes on one GPU go
through host memory: they compare the classes, not a multi-GPU run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

from sandbox.plugins import load_registry
from sandbox.recipe import load_recipe, resolve_components
from sandbox.train.builder import build_model
from sandbox.processes.batchnorm import synchronise_batchnorm

TOLERANCE = 1e-3
"""The largest relative difference from the reference a class may show (float32 summation order)."""


def arguments() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="a recipe setting, KEY=VALUE")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--crop", type=int, default=513)
    parser.add_argument("--batch", type=int, default=4, help="images per process")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (honest wall-clock times)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, images: torch.Tensor, elements: int) -> torch.Tensor:
    """One train-mode forward and backward of this process's share of a loss over ``elements`` logits
    of every process; the logits (detached)."""
    model.zero_grad(set_to_none=True)
    logits = model(images)[0]
    (logits.float().square().sum() / elements).backward()
    return logits.detach()


def training_without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in train mode but for its dropout layers (their draws differ between a batch and its halves)."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.eval()
    return model


def gradients(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter's gradient, flattened into one vector."""
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def counted_syncs(model: torch.nn.Module, images: torch.Tensor, elements: int, device: torch.device) -> int | None:
    """Host-device synchronisations of one step, by CUDA's detector (None on a CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(model, images, elements)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|``."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-12))


def main() -> int:
    """Measure each class; the main process prints the table. 0 when the classes agree, else 1."""
    options = arguments()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    registry = load_registry()
    recipe = resolve_components(load_recipe(options.recipe, options.overrides), registry)
    torch.manual_seed(0)
    base = build_model(recipe, registry, options.num_classes)
    generator = torch.Generator().manual_seed(1 + rank)
    images = torch.randn(options.batch, 3, options.crop, options.crop, generator=generator).to(device)
    every = [torch.empty_like(images) for _ in range(dist.get_world_size())]
    dist.all_gather(every, images)
    reference_model = training_without_dropout(copy.deepcopy(base).to(device))  # plain BatchNorm, the whole batch
    elements = len(every) * options.batch * options.num_classes * options.crop * options.crop  # logits at input size
    reference_logits = train_step(reference_model, torch.cat(every), elements).chunk(len(every))[rank]
    reference_gradients = gradients(reference_model)
    del reference_model
    rows = []
    for implementation in ["sandbox", "torch"] if device.type == "cuda" else ["sandbox"]:
        model = training_without_dropout(synchronise_batchnorm(copy.deepcopy(base), device, implementation).to(device))
        logits = train_step(model, images, elements)
        summed = gradients(model)
        dist.all_reduce(summed)  # as DDP, up to its division by the number of processes
        difference = max(relative_difference(logits, reference_logits), relative_difference(summed, reference_gradients))
        syncs = counted_syncs(model, images, elements, device)
        times = []
        for index in range(options.warmup + options.steps):
            synchronize(device)
            start = time.perf_counter()
            train_step(model, images, elements)
            synchronize(device)
            if index >= options.warmup:
                times.append((time.perf_counter() - start) * 1000)
        rows.append((implementation, statistics.median(times), syncs, difference))
        del model
    agree = all(row[3] <= TOLERANCE for row in rows)
    if rank == 0:
        where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
        print(f"batchnorm classes: 2 processes on one {where}, gloo, {recipe.model.name} on {recipe.backbone.name}, "
              f"crop {options.crop}, {options.batch} images per process, torch {torch.__version__}")
        print(f"{'sync_bn_impl':<14}{'ms/step':>10}{'syncs/step':>12}{'rel. diff':>12}  (syncs: CUDA's detector)")
        for implementation, milliseconds, syncs, difference in rows:
            print(f"{implementation:<14}{milliseconds:>10.1f}{'-' if syncs is None else syncs:>12}{difference:>12.2e}")
        print(f"logits and gradients equal to one process's on the whole batch within {TOLERANCE:g}: {'yes' if agree else 'NO'}")
    dist.destroy_process_group()
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
