"""Run a perturbation on a trained run's crops exactly as the training step does, and measure it.

The perturbation is never called directly: the step's own hook
(:meth:`sandbox.train.step.SemiSupervisedStep.perturbation_hook`) is handed to the student's training
pass (:class:`sandbox.train.student_pass.StudentPass`), which calls it with the classifier (auxiliary
BatchNorm statistics), the trusted pixels and the density estimator, or on the encoder's maps with
``perturb_at = "encoder"``. A thin recorder around the hook keeps what went in and came out.

What is compared: the student's clean and perturbed predictions through the same classifier
statistics the perturbed view uses (the auxiliary ones under Mix BN), so that a flip is the step's
doing, not the difference between two sets of BatchNorm statistics. Pixels are trusted as the step
decides: the pseudo-labeller's (teacher's, or with ``pseudo_labels = "student"`` the student's)
confidence against ``train.threshold``, crop padding excluded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from sandbox.analysis.probe import (
    PerturbationFigures,
    ViewFigures,
    equal_norm_noise,
    flipped,
    fraction,
    log_likelihoods,
    masked_mean,
    relative_norms,
    spread,
)
from sandbox.analysis.probe_models import ProbedRun
from sandbox.api import ClassifierOutput, PerturbFn, upsample
from sandbox.recipe import TrainSection
from sandbox.train.builder import MethodComponents
from sandbox.train.step import SemiSupervisedStep, resize_mask
from sandbox.train.student_pass import classify, dual_norms

Classify = Callable[[Tensor], ClassifierOutput]

NOISE_SALT = 0x6E015E
"""Added to the recipe's seed for the equal-norm noise: draws of their own, not those of a noise plugin."""


@dataclass
class Recorder:
    """Wraps the step's ``perturb`` hook and keeps each call's input, output and classifier."""

    hook: PerturbFn
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor | None] = field(default_factory=list)
    classify: Classify | None = None

    def __call__(
        self, features: Tensor | list[Tensor], classify: Classify, clean: ClassifierOutput | None
    ) -> Tensor | list[Tensor] | None:
        """Call the hook as the student's pass would and record the call (at the encoder: each map)."""
        perturbed = self.hook(features, classify, clean)
        maps = features if isinstance(features, list) else [features]
        moved = [None] * len(maps) if perturbed is None else (perturbed if isinstance(perturbed, list) else [perturbed])
        self.inputs.extend(m.detach() for m in maps)
        self.outputs.extend(None if m is None else m.detach() for m in moved)
        self.classify = classify
        return perturbed


@dataclass
class BatchOutcome:
    """One batch of probed crops, in host memory: what :func:`summarise` and the figure need."""

    images: Tensor
    """Normalised crops ``(B, 3, H, W)``."""
    padding: Tensor
    trusted: Tensor
    """Trusted pixels ``(B, H, W)``; ``trusted_small``: at the features' resolution ``(B, h, w)``."""
    trusted_small: Tensor
    perturbed_view: bool
    step_norms: Tensor
    noise_norms: Tensor
    predictions: dict[str, Tensor]
    """Class ids ``(B, H, W)`` of the ``clean``, ``step`` and ``noise`` views."""
    log_likelihoods: dict[str, Tensor] | None
    """Log-likelihood maps ``(B, h, w)`` of each view's embedding (None without an estimator)."""


def pseudo_label_probs(run: ProbedRun, settings: TrainSection, images: Tensor) -> Tensor:
    """Class probabilities ``(B, K, H, W)`` of the pseudo-labeller the recipe trains with."""
    labeller = run.teacher if settings.pseudo_labels == "teacher" else run.student.network
    with torch.no_grad():
        return labeller(images).logits.float().softmax(dim=1)


def uses_mix_bn(run: ProbedRun) -> bool:
    """Whether the student's classifier has auxiliary BatchNorm statistics (Mix BN)."""
    return bool(dual_norms(run.student.network.classifier))


def perturbed_features(
    run: ProbedRun, settings: TrainSection, step: SemiSupervisedStep, images: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor | None, Classify]:
    """The classifier's input features of ``images``, their perturbation (None: no perturbed view) and
    the classifier the perturbed view goes through, by way of the student's training pass.

    With ``perturb_at = "encoder"`` the encoder's maps are perturbed; the features are then the
    decoded clean and perturbed maps (the network's own ``decode``).
    """
    recorder = Recorder(step.perturbation_hook({}, valid, None))
    with torch.enable_grad():  # as in training: a perturbation may take gradients
        run.student(images, perturb=recorder, num_perturbed=images.shape[0], perturb_at=settings.perturb_at)
    network = run.student.network
    if settings.perturb_at == "classifier":
        assert recorder.classify is not None
        return recorder.inputs[0], recorder.outputs[0], recorder.classify
    auxiliary = uses_mix_bn(run)
    with torch.no_grad():
        features = network.decode(recorder.inputs)
        moved = None if any(o is None for o in recorder.outputs) else network.decode(recorder.outputs)
    return features, moved, lambda x: classify(network, x, auxiliary=auxiliary)


def predictions(classifier: Classify, views: dict[str, Tensor], size: torch.Size) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Class ids at ``size`` and embeddings of each view's features."""
    ids, embeddings = {}, {}
    with torch.no_grad():
        for name, features in views.items():
            output = classifier(features)
            ids[name] = upsample(output.logits.float(), size).argmax(dim=1).cpu()
            embeddings[name] = output.embedding
    return ids, embeddings


def probe_batch(
    run: ProbedRun, method: MethodComponents, settings: TrainSection, images: Tensor, padding: Tensor,
    generator: torch.Generator,
) -> BatchOutcome:
    """Perturb one batch of crops through the step's hook, add noise of equal norm, and measure both."""
    images, padding = images.to(run.device), padding.to(run.device)
    step = SemiSupervisedStep(settings, method, run.source.ignore_index, run.recipe.seed)
    valid = step.trusted(pseudo_label_probs(run, settings, images), padding)
    features, moved, classifier = perturbed_features(run, settings, step, images, valid)
    perturbed = features if moved is None else moved.to(features.dtype)
    noisy = equal_norm_noise(features, perturbed, generator)
    trusted_small = resize_mask(valid, features.shape[-2:])
    ids, embeddings = predictions(classifier, {"clean": features, "step": perturbed, "noise": noisy}, images.shape[-2:])
    density = run.density
    likelihoods = None if density is None else {name: log_likelihoods(density, e).cpu() for name, e in embeddings.items()}
    return BatchOutcome(
        images=images.cpu(), padding=padding.cpu(), trusted=valid.cpu(), trusted_small=trusted_small.cpu(),
        perturbed_view=moved is not None,
        step_norms=relative_norms(features, perturbed, trusted_small).cpu(),
        noise_norms=relative_norms(features, noisy, trusted_small).cpu(),
        predictions=ids, log_likelihoods=likelihoods,
    )


def view_figures(outcomes: list[BatchOutcome], view: str) -> ViewFigures:
    """The figures of ``view`` (``step`` or ``noise``) over every probed batch."""
    trusted = torch.cat([o.trusted for o in outcomes])
    changed = torch.cat([flipped(o.predictions["clean"], o.predictions[view]) for o in outcomes])
    norms = torch.cat([o.step_norms if view == "step" else o.noise_norms for o in outcomes])
    figures = ViewFigures(relative_norm=spread(norms), flipped_fraction=fraction(changed, trusted))
    if outcomes[0].log_likelihoods is not None:
        pixels = torch.cat([o.trusted_small for o in outcomes])
        figures.density_before = masked_mean(torch.cat([o.log_likelihoods["clean"] for o in outcomes]), pixels)
        figures.density_after = masked_mean(torch.cat([o.log_likelihoods[view] for o in outcomes]), pixels)
    return figures


def summarise(name: str, outcomes: list[BatchOutcome], options: dict | None = None) -> PerturbationFigures:
    """Every figure of perturbation ``name`` over the probed batches."""
    trusted = torch.cat([o.trusted for o in outcomes])
    padding = torch.cat([o.padding for o in outcomes])
    return PerturbationFigures(
        name=name,
        perturbed_view=all(o.perturbed_view for o in outcomes),
        trusted_fraction=fraction(trusted, ~padding),
        step=view_figures(outcomes, "step"),
        noise=view_figures(outcomes, "noise"),
        options=dict(options or {}),
    )


def probe_perturbation(
    run: ProbedRun, method: MethodComponents, settings: TrainSection, images: Tensor, padding: Tensor, batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[BatchOutcome]:
    """Probe every crop in batches of ``batch_size``; the perturbation's and the noise's randomness are
    seeded by the recipe's seed (the same figures on every call). ``progress`` gets the number of crops
    probed so far after each batch."""
    generator = torch.Generator().manual_seed(run.recipe.seed + NOISE_SALT)
    outcomes = []
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if run.device.type == "cuda" else []):
        torch.manual_seed(run.recipe.seed)
        for start in range(0, images.shape[0], batch_size):
            end = start + batch_size
            outcomes.append(probe_batch(run, method, settings, images[start:end], padding[start:end], generator))
            if progress is not None:
                progress(min(end, images.shape[0]))
    return outcomes


__all__ = ["BatchOutcome", "Recorder", "probe_batch", "probe_perturbation", "summarise"]
