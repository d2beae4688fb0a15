"""Timing of whole training steps on synthetic data at a recipe's crop and batch (``sandbox bench``).

Each timed step is the training loop's own :class:`~sandbox.train.iteration.TrainingIteration`
(the step, backward, optimizer, schedule, non-finite check, EMA teacher and its buffers), with
the recipe's optimizer and schedule, its networks built by the training loop's own
:func:`~sandbox.train.levers.build_networks` (the recipe's speed levers applied). Every pixel is
trusted (threshold 0) so that a perturbation's cost is measured at its worst.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from sandbox.api import IGNORE_INDEX
from sandbox.recipe import ComponentSpec, Recipe
from sandbox.registry import Registry
from sandbox.train.accelerator import effective_precision, make_accelerator
from sandbox.train.builder import build_method, build_model, check_crop_fits
from sandbox.train.iteration import TrainingIteration, reads_teacher
from sandbox.train.levers import build_networks
from sandbox.train.step import LabeledBatch, SemiSupervisedStep, UnlabeledBatch
from sandbox.train.student_pass import network_of


@dataclass
class StepTiming:
    """Measured figures of one perturbation's training step."""

    perturbation: str
    median_ms: float
    p90_ms: float
    images_per_s: float
    peak_memory_gib: float | None
    gflops_per_image: float | None
    """Forward GFLOPs of one image (None when not counted)."""
    precision: str
    """The precision the step really ran in (``fp16`` on a CPU runs in float32: ``no``)."""


def forward_gflops(model: torch.nn.Module, crop: int, device: torch.device) -> float:
    """GFLOPs of one inference forward pass of one ``crop`` x ``crop`` image."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, crop, crop, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so that wall-clock times are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SyntheticTraining:
    """A recipe's training iteration set up on one random batch (what ``sandbox bench`` times)."""

    accelerator: Accelerator
    model: torch.nn.Module
    """The Accelerate-prepared student."""
    iteration: TrainingIteration
    labeled: LabeledBatch
    unlabeled: UnlabeledBatch
    partners: UnlabeledBatch | None
    """CutMix partners (``train.cutmix_partners = "stream"``)."""


def synthetic_training(
    recipe: Recipe, registry: Registry, num_classes: int, perturbation: ComponentSpec, schedule: bool = False
) -> SyntheticTraining:
    """The recipe's model, method, optimizer and iteration (every step semi-supervised and
    perturbed, every pixel trusted) and a random batch at the recipe's crop.

    ``schedule``: keep the recipe's ``warmup_iters`` and ``perturbation_start_iters`` (``sandbox
    plan`` traces a step of each phase of a run); every pixel is trusted all the same."""
    schedule_keys = {} if schedule else {"perturbation_start_iters": 0, "warmup_iters": 0}
    settings = recipe.train.model_copy(update={"threshold": 0.0, **schedule_keys})
    recipe = recipe.model_copy(update={"perturbation": perturbation, "train": settings})
    accelerator = make_accelerator(settings.mixed_precision)
    device = accelerator.device
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, registry, num_classes)
    check_crop_fits(recipe, model)
    method = build_method(recipe, registry, num_classes, model.embedding_channels)
    networks = build_networks(model, accelerator, settings, settings.lr)  # the training loop's levers
    teacher = networks.teacher
    model, optimizer, scheduler = networks.prepare(accelerator)
    method.perturbation.to(device)
    if method.density is not None:
        method.density.to(device)
    step_fn = SemiSupervisedStep(settings, method, IGNORE_INDEX, recipe.seed)
    iteration = TrainingIteration(
        accelerator, model, teacher, optimizer, scheduler, step_fn, settings, teacher_read=reads_teacher(recipe)
    )
    crop, labeled_count, unlabeled_count = settings.crop_size, settings.batch_size, settings.unlabeled_batch_size
    labeled = LabeledBatch(
        torch.randn(labeled_count, 3, crop, crop, device=device),
        torch.randint(0, num_classes, (labeled_count, crop, crop), device=device),
    )

    def unlabeled_batch() -> UnlabeledBatch:
        second = torch.randn(unlabeled_count, 3, crop, crop, device=device) if settings.strong_views == 2 else None
        return UnlabeledBatch(
            torch.randn(unlabeled_count, 3, crop, crop, device=device),
            torch.randn(unlabeled_count, 3, crop, crop, device=device),
            torch.zeros(unlabeled_count, crop, crop, dtype=torch.bool, device=device),
            second,
        )

    unlabeled = unlabeled_batch()
    partners = unlabeled_batch() if settings.cutmix_partners == "stream" else None
    return SyntheticTraining(accelerator, model, iteration, labeled, unlabeled, partners)


def time_training_steps(
    recipe: Recipe,
    registry: Registry,
    num_classes: int,
    perturbation: ComponentSpec,
    steps: int,
    warmup: int,
    count_flops: bool = True,
) -> StepTiming:
    """Median and p90 wall time of ``steps`` semi-supervised steps after ``warmup`` untimed ones
    (which absorb a compiled network's compilation); ``count_flops``: also one forward's GFLOPs."""
    training = synthetic_training(recipe, registry, num_classes, perturbation)
    accelerator, model, iteration = training.accelerator, training.model, training.iteration
    labeled, unlabeled, device = training.labeled, training.unlabeled, accelerator.device
    crop, labeled_count, unlabeled_count = recipe.train.crop_size, len(labeled.images), len(unlabeled.weak)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        iteration(index, labeled, unlabeled, training.partners)  # the training loop's own iteration code
        synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    times_ms = sorted(1000 * t for t in times)
    median = statistics.median(times_ms)
    return StepTiming(
        perturbation=perturbation.name,
        median_ms=median,
        p90_ms=times_ms[min(len(times_ms) - 1, int(0.9 * len(times_ms)))],
        images_per_s=(labeled_count + unlabeled_count) * accelerator.num_processes * 1000 / median,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        precision=effective_precision(accelerator),
        gflops_per_image=forward_gflops(network_of(accelerator.unwrap_model(model)), crop, device) if count_flops else None,
    )
