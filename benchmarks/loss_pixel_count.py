"""How far ``train.loss_pixel_count = "per_process"`` trains from ``"global"`` on 2 processes (a benchmark).

On N processes ``global`` divides each loss term by every process's pixel count summed (N processes
train what one process trains on the concatenated batch); ``per_process`` divides it by the
process's own count, DDP then averaging the processes' gradients (what DDFP's and UniMatch's code
do on their GPUs). The two agree when every process has the same counts. This script measures how
far apart they are::

    .venv/bin/python benchmarks/loss_pixel_count.py            # about 6 minutes on 2 CPU cores
    .venv/bin/python benchmarks/loss_pixel_count.py --draws 4  # fewer batches of the stream

For two frameworks on the embedded ``shapes`` data (``recipes/quickstart_unimatch.toml``: UniMatch's
step, image-pixel normalisation; ``recipes/quickstart.toml`` with channel dropout in place of the
density-descending perturbation: DDFP's step, trusted-pixel normalisation), a network warm-started
by supervised steps (so that some pseudo-labels are trusted) runs one semi-supervised step on 2
processes simulated by threads (the step's all-reduce sums what both pass; no process is launched)
with each process's batch as the stream gives it (2 labeled, 2 unlabeled and, for UniMatch, 2
partner images of the recipe's crop, random scale 0.5-2.0: padded where the scaled image is smaller
than the crop), once in each mode. The forward passes are the same in both modes (each process's
BatchNorm over its own batch, the feature dropout a fixed mask of every other channel): only the
normalisation differs. Printed: the relative difference ``|per_process - global| / |global|`` of
the loss (the processes' mean, what their averaged gradients descend), of each term, and of the
averaged gradient of every student parameter (``||difference|| / ||global's||``), for

- typical batches, as drawn: the median and the largest over ``--draws`` batches of the stream;
- the same batches with one of process 0's labeled images and one of its unlabeled images made 75%
  padding (the right three quarters of the crop: ignored labels, padding in every view);
- the same with every image of process 0 75% padding.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import sandbox.processes.collectives as distributed
import sandbox.train.step as step_module
from sandbox.api import SegmentationSource
from sandbox.data.views import normalize
from sandbox.plugins import load_registry
from sandbox.recipe import Recipe, load_recipe, resolve_components
from sandbox.train.builder import build_dataset, build_method, build_model, build_partner_view, build_train_views
from sandbox.train.step import LabeledBatch, SemiSupervisedStep, UnlabeledBatch
from sandbox.train.student_pass import StudentPass

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = {
    "UniMatch (quickstart_unimatch)": (ROOT / "recipes" / "quickstart_unimatch.toml", []),
    "DDFP's step, dropout (quickstart)": (ROOT / "recipes" / "quickstart.toml", ["perturbation.name=dropout", "model.dropout=0.0"]),
}
"""Each framework's recipe and overrides."""
PROCESSES, PER_PROCESS_BATCH = 2, 2
"""The simulated processes, and the labeled, unlabeled (and partner) images of each."""
WARM_START_STEPS = 40
"""Supervised steps before the measured one: from scratch no pseudo-label passes the threshold."""
PADDED = 0.75
"""The padded part of a padded image."""
TERMS = ("loss", "loss_sup", "loss_unsup", "loss_perturbed", "gradient")
"""The compared values: the logged loss and its terms, the averaged gradient."""


def simulated_processes(runs: list[Callable[[], Any]]) -> list[Any]:
    """``runs[rank]()`` of each simulated process at once in threads: the step's ``sum_over_processes``
    sums what every thread passes at the same call and ``process_count()`` is their number."""
    count = len(runs)
    barrier = threading.Barrier(count, timeout=300)
    slots: list[torch.Tensor] = [torch.zeros(())] * count
    local = threading.local()
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def all_reduce(values: torch.Tensor) -> torch.Tensor:
        slots[local.rank] = values.clone()
        barrier.wait()
        summed = torch.stack(slots).sum(dim=0)
        barrier.wait()
        return summed

    def process(rank: int) -> None:
        local.rank = rank
        try:
            results[rank] = runs[rank]()
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)
            barrier.abort()

    originals = step_module.sum_over_processes, distributed.process_count
    step_module.sum_over_processes, distributed.process_count = all_reduce, lambda: count
    try:
        threads = [threading.Thread(target=process, args=(rank,)) for rank in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        step_module.sum_over_processes, distributed.process_count = originals
    if errors:
        raise errors[0]
    return results


def fixed_channel_dropout(self: Any, features: torch.Tensor, context: Any) -> torch.Tensor:
    """Channel dropout with a fixed draw (every other channel zeroed, the rest doubled): the same in both modes."""
    keep = (torch.arange(features.shape[1], device=features.device) % 2 == 0).to(features.dtype) * 2.0
    return features * keep.view(1, -1, *[1] * (features.dim() - 2))


def warm_start(recipe: Recipe, source: SegmentationSource, network: torch.nn.Module) -> torch.nn.Module:
    """``network`` after :data:`WARM_START_STEPS` supervised SGD steps on batches of 8 crops of the
    labeled view (some pseudo-labels then pass the threshold)."""
    labeled_view, _ = build_train_views(source, recipe)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    for index in range(WARM_START_STEPS):
        samples = [labeled_view[(position % len(source.labeled), position + 10**6)] for position in range(8 * index, 8 * index + 8)]
        images, masks = (torch.stack(parts) for parts in zip(*samples))
        optimizer.zero_grad()
        F.cross_entropy(network(images)[0], masks, ignore_index=source.ignore_index).backward()
        optimizer.step()
    return network


Shares = list[tuple[LabeledBatch, UnlabeledBatch, "UnlabeledBatch | None"]]


def process_batches(recipe: Recipe, source: SegmentationSource, draw: int) -> Shares:
    """Each process's labeled, unlabeled and partner batch of the ``draw``-th global batch of the streams
    (rank r takes the positions r, r + N, ..., as the training loop's sampler)."""
    labeled_view, unlabeled_view = build_train_views(source, recipe)
    partner_view = build_partner_view(source, recipe) if recipe.train.cutmix_partners == "stream" else None
    shares = []
    for rank in range(PROCESSES):
        positions = [draw * PROCESSES * PER_PROCESS_BATCH + rank + PROCESSES * i for i in range(PER_PROCESS_BATCH)]

        def stacked(view: Any, size: int) -> list[torch.Tensor]:
            samples = [view[(position % size, position)] for position in positions]
            return [torch.stack(parts) for parts in zip(*samples)]

        labeled = LabeledBatch(*stacked(labeled_view, len(source.labeled)))
        unlabeled = UnlabeledBatch(*stacked(unlabeled_view, len(source.unlabeled)))
        partners = None if partner_view is None else UnlabeledBatch(*stacked(partner_view, len(source.unlabeled)))
        shares.append((labeled, unlabeled, partners))
    return shares


def pad(shares: Shares, images: int) -> None:
    """Make the first ``images`` labeled and unlabeled images of process 0 :data:`PADDED` padding, in place:
    the right part of the crop ignored in the labels, padding in every view (the image there the fill)."""
    labeled, unlabeled, _ = shares[0]
    width = labeled.images.shape[-1]
    start = round(width * (1 - PADDED))
    fill = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))[0, :, 0, 0].view(3, 1, 1)
    for index in range(images):
        labeled.images[index, :, :, start:] = fill
        labeled.masks[index, :, start:] = 255
        unlabeled.padding[index, :, start:] = True
        for view in (unlabeled.weak, unlabeled.strong, unlabeled.strong2):
            if view is not None:
                view[index, :, :, start:] = fill


def trained(recipe: Recipe, registry: Any, network: torch.nn.Module, classes: int, shares: Shares, mode: str) -> dict[str, torch.Tensor]:
    """One semi-supervised step on the simulated processes in ``mode``: the processes' mean of each logged
    loss term and the averaged gradient of every student parameter (DDP's), flattened."""
    settings = recipe.train.model_copy(update={"loss_pixel_count": mode})

    def process(rank: int) -> Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor], torch.nn.Module]]:
        student = copy.deepcopy(network).train()
        teacher = copy.deepcopy(network).train()
        method = build_method(recipe, registry, classes, student.embedding_channels)

        def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.nn.Module]:
            step = SemiSupervisedStep(settings, method, 255, recipe.seed)
            labeled, unlabeled, partners = shares[rank]
            loss, logs = step.semi_supervised(settings.warmup_iters, StudentPass(student), teacher, labeled, unlabeled, partners)
            return loss, logs, student

        return run

    results = simulated_processes([process(rank) for rank in range(PROCESSES)])
    values = {key: torch.stack([logs[key].float() for _, logs, _ in results]).mean() for key in (*TERMS[:-1], "trusted_ratio")}
    gradients = []
    for loss, _, student in results:
        parameters = [p for p in student.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        gradients.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(parameters, grads)]))
    values["gradient"] = torch.stack(gradients).mean(dim=0)
    return values


def relative_differences(recipe: Recipe, registry: Any, network: torch.nn.Module, classes: int, shares: Shares) -> dict[str, float]:
    """``|per_process - global| / |global|`` of each of :data:`TERMS`; ``trusted_ratio``, the same in both modes."""
    both = {mode: trained(recipe, registry, network, classes, shares, mode) for mode in ("global", "per_process")}
    differences = {
        key: float((both["per_process"][key] - both["global"][key]).norm() / both["global"][key].norm().clamp(min=1e-12))
        for key in TERMS
    }
    return {**differences, "trusted_ratio": float(both["global"]["trusted_ratio"])}


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=16, help="batches of the stream measured (default 16)")
    args = parser.parse_args()
    import sandbox_builtins.perturbations as perturbations

    perturbations.FeatureDropout.forward = fixed_channel_dropout
    registry = load_registry()
    began = time.monotonic()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {PROCESSES} simulated processes x "
          f"{PER_PROCESS_BATCH} images, {args.draws} draws")
    print("| framework | batch | loss | loss_sup | loss_unsup | loss_perturbed | gradient | trusted_ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for framework, (path, overrides) in FRAMEWORKS.items():
        recipe = resolve_components(load_recipe(path, overrides), registry)
        source = build_dataset(recipe, registry)
        torch.manual_seed(recipe.seed)
        network = warm_start(recipe, source, build_model(recipe, registry, source.num_classes))
        for label, padded in (("as drawn", 0), ("one image 75% padding", 1), ("every image 75% padding", PER_PROCESS_BATCH)):
            rows = []
            for draw in range(args.draws):
                shares = process_batches(recipe, source, draw)
                pad(shares, padded)
                rows.append(relative_differences(recipe, registry, network, source.num_classes, shares))
            cells = [f"{statistics.median(row[key] for row in rows):.2%} ({max(row[key] for row in rows):.2%})" for key in TERMS]
            cells.append(f"{statistics.median(row['trusted_ratio'] for row in rows):.2f}")
            print(f"| {framework} | {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"relative differences per_process vs global: median (largest) over the draws; trusted_ratio: median; "
          f"{time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
