"""One training step, the same code path for every method (DDFP.md, "Framework").

What differs between methods lives in the plugins: the perturbation (and whether it uses a
density estimator) and the consistency losses. The step never looks at a component's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.api import ClassifierOutput, PerturbationContext
from sandbox.recipe import TrainSection
from sandbox.train.builder import MethodComponents
from sandbox.train.cutmix import apply_cutmix, cutmix_boxes
from sandbox.train.plugin_calls import blame, check_density_stats, check_loss, check_perturbed


@dataclass
class LabeledBatch:
    """Weakly augmented labeled images ``(B, 3, H, W)`` and masks ``(B, H, W)``."""

    images: Tensor
    masks: Tensor


@dataclass
class UnlabeledBatch:
    """Weak and strong views ``(B, 3, H, W)`` of unlabeled images, and their padding ``(B, H, W)``."""

    weak: Tensor
    strong: Tensor
    padding: Tensor


def resize_mask(mask: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of an integer or boolean ``(B, H, W)`` mask."""
    resized = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0]
    return resized.to(mask.dtype)


@torch.no_grad()
def relative_step(features: Tensor, perturbed: Tensor, valid: Tensor) -> Tensor:
    """Mean over trusted pixels (all pixels when none is) of ``||perturbed - features|| / ||features||``.

    How far a perturbation moves the classifier input relative to the features' own size: the
    scale on which a fixed ``eps`` has to be judged.
    """
    ratio = (perturbed - features).float().norm(dim=1) / features.float().norm(dim=1).clamp(min=1e-12)
    return ratio[valid].mean() if valid.any() else ratio.mean()


class SemiSupervisedStep:
    """Computes the loss of one step: supervised warm-up, then mean teacher with a perturbed view."""

    def __init__(self, settings: TrainSection, method: MethodComponents, ignore_index: int, seed: int) -> None:
        self.settings = settings
        self.method = method
        self.ignore_index = ignore_index
        self.seed = seed
        self.skipped_density_updates = 0
        """Density updates whose NLL was not finite since :meth:`take_skipped_density_updates`."""

    def take_skipped_density_updates(self) -> int:
        """The number of skipped density updates since the last call (and reset it)."""
        count, self.skipped_density_updates = self.skipped_density_updates, 0
        return count

    def supervised(self, student: nn.Module, teacher: nn.Module, labeled: LabeledBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Warm-up: cross-entropy on labeled images only.

        With ``teacher_statistics = "own"`` the teacher also predicts the labeled images (no
        gradient), so that its BatchNorm running statistics are of clean images, as the reference.
        """
        if self.settings.teacher_statistics == "own":
            with torch.no_grad():
                teacher(labeled.images)
        logits = student(labeled.images).logits
        loss = F.cross_entropy(logits.float(), labeled.masks, ignore_index=self.ignore_index)
        return loss, {"loss": loss.detach(), "loss_sup": loss.detach()}

    def semi_supervised(
        self, step: int, student: nn.Module, teacher: nn.Module, labeled: LabeledBatch, unlabeled: UnlabeledBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher pseudo-labels, online density update, student on labeled + strong + perturbed."""
        settings, method = self.settings, self.method
        num_labeled, num_unlabeled = labeled.images.shape[0], unlabeled.weak.shape[0]
        with torch.no_grad():
            teacher_out = teacher(torch.cat([labeled.images, unlabeled.weak]))
            probs = teacher_out.logits[num_labeled:].float().softmax(dim=1)
        logs: dict[str, Tensor] = {}
        if method.density is not None:
            logs.update(self.fit_density(teacher_out.embedding, labeled.masks, unlabeled.padding, num_labeled))

        strong, padding = unlabeled.strong, unlabeled.padding
        if num_unlabeled > 1:  # one image has no partner to mix with (the loop warns at start)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            boxes = cutmix_boxes(
                num_unlabeled, *strong.shape[-2:], settings.cutmix_p, generator, settings.cutmix_box, settings.cutmix_decision
            )
            strong, probs, padding = apply_cutmix(boxes, strong, probs, padding)
        valid = (probs.max(dim=1).values > settings.threshold) & ~padding

        def perturb(features: Tensor, classify: Callable[[Tensor], ClassifierOutput]) -> Tensor | None:
            context = PerturbationContext(classify, resize_mask(valid, features.shape[-2:]), method.density)
            label = method.label("perturbation")
            with blame(label, "forward"):
                perturbed = check_perturbed(label, features, method.perturbation(features, context))
            if perturbed is not None:
                logs["perturbation_relative_norm"] = relative_step(features, perturbed, context.valid)
            return perturbed

        perturbing = step >= settings.perturbation_start_iters
        out = student(torch.cat([labeled.images, strong]), perturb=perturb if perturbing else None, num_perturbed=num_unlabeled)
        loss_sup = F.cross_entropy(out.logits[:num_labeled].float(), labeled.masks, ignore_index=self.ignore_index)
        loss_unsup = self.consistency("strong_loss", out.logits[num_labeled:], probs, valid)
        perturbed_view = out.perturbed_logits is not None
        loss = loss_sup + settings.strong_weight(perturbed_view) * loss_unsup
        logs.update(loss_sup=loss_sup.detach(), loss_unsup=loss_unsup.detach(), trusted_ratio=valid.float().mean())
        if perturbed_view:
            loss_perturbed = self.consistency("perturbed_loss", out.perturbed_logits, probs, valid)
            loss = loss + settings.perturbed_weight * loss_perturbed
            logs["loss_perturbed"] = loss_perturbed.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def nonfinite_sources(self, logs: dict[str, Tensor]) -> str:
        """Which of this process's losses in ``logs`` are not finite, and the plugins behind them."""
        sources = {
            "loss_sup": "the supervised loss",
            "loss_unsup": f"the strong view with {self.method.label('strong_loss')}",
            "loss_perturbed": (
                f"the perturbed view of {self.method.label('perturbation')} with {self.method.label('perturbed_loss')}"
            ),
        }
        bad = [key for key in sources if key in logs and not bool(torch.isfinite(logs[key]).all())]
        if not bad:
            return "non-finite on another process"
        return "; ".join(f"non-finite {key}: {sources[key]}" for key in bad)

    def consistency(self, role: str, logits: Tensor, target_probs: Tensor, valid: Tensor) -> Tensor:
        """The consistency loss in ``role`` (``strong_loss`` or ``perturbed_loss``), checked."""
        label = self.method.label(role)
        with blame(label, "forward"):
            return check_loss(label, getattr(self.method, role)(logits, target_probs, valid))

    def fit_density(self, embedding: Tensor, masks: Tensor, padding: Tensor, num_labeled: int) -> dict[str, Tensor]:
        """One estimator update on the teacher's pixel features: labeled with GT, unlabeled as mixture."""
        assert self.method.density is not None
        size = embedding.shape[-2:]
        padding = resize_mask(padding, size)
        labels = torch.cat([resize_mask(masks, size), torch.full(padding.shape, -1, dtype=masks.dtype, device=masks.device)])
        keep = labels != self.ignore_index
        keep[num_labeled:] &= ~padding
        pixels = embedding.detach().permute(0, 2, 3, 1)[keep].float()
        label = self.method.label("density")
        with blame(label, "fit_step"):
            stats = check_density_stats(label, self.method.density.fit_step(pixels, labels[keep]))
        if not math.isfinite(stats.get("nll", 0.0)):
            # The estimator made no update (the built-ins skip a non-finite NLL); not logged as a value.
            self.skipped_density_updates += 1
            stats = {key: value for key, value in stats.items() if key not in ("nll", "accuracy")}
        return {f"density_{key}": torch.tensor(value) for key, value in stats.items()}
