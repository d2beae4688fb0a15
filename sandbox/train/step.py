"""One training step, the same code path for every method (DDFP.md, "Framework").

What differs between methods lives in the plugins: the perturbation (and whether it uses a
density estimator) and the consistency losses. The step never looks at a component's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.api import ClassifierOutput, PerturbationContext, PerturbFn, SegmentationOutput
from sandbox.processes.collectives import share_of_total, sum_over_processes
from sandbox.host_side import host_side, to_device
from sandbox.recipe import TrainSection
from sandbox.train.builder import MethodComponents
from sandbox.train.cutmix import apply_cutmix, cutmix_boxes, paste
from sandbox.train.log_window import is_log_step
from sandbox.train.plugin_calls import blame, check_density_stats, check_loss, check_perturbed


@dataclass
class LabeledBatch:
    """Weakly augmented labeled images ``(B, 3, H, W)`` and masks ``(B, H, W)``.

    ``host_masks``: the masks in host memory, kept by :meth:`to` (the step counts labeled pixels
    there, without waiting for the device); the masks themselves when they are in host memory.
    """

    images: Tensor
    masks: Tensor
    host_masks: Tensor | None = None

    def __post_init__(self) -> None:
        if self.host_masks is None and self.masks.device.type == "cpu":
            self.host_masks = self.masks

    def to(self, device: torch.device) -> LabeledBatch:
        """This batch on ``device`` (copied without waiting), its masks kept in host memory."""
        return LabeledBatch(to_device(self.images, device), to_device(self.masks, device), self.host_masks)


@dataclass
class UnlabeledBatch:
    """Weak and strong views ``(B, 3, H, W)`` of unlabeled images, their padding ``(B, H, W)`` and,
    with ``train.strong_views = 2``, a second strong view.

    ``host_padding``: the padding in host memory, as :attr:`LabeledBatch.host_masks`.
    """

    weak: Tensor
    strong: Tensor
    padding: Tensor
    strong2: Tensor | None = None
    host_padding: Tensor | None = None

    def __post_init__(self) -> None:
        if self.host_padding is None and self.padding.device.type == "cpu":
            self.host_padding = self.padding

    def to(self, device: torch.device) -> UnlabeledBatch:
        """This batch on ``device`` (copied without waiting), its padding kept in host memory."""
        second = None if self.strong2 is None else to_device(self.strong2, device)
        return UnlabeledBatch(to_device(self.weak, device), to_device(self.strong, device),
                              to_device(self.padding, device), second, self.host_padding)


def resize_mask(mask: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of an integer or boolean ``(B, H, W)`` mask."""
    resized = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0]
    return resized.to(mask.dtype)


def density_labels(
    masks: Tensor, padding: Tensor, size: torch.Size | tuple[int, int], ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Which pixels of a ``size`` feature map of labeled + unlabeled images train the density, and
    their labels: ``(keep (N,) bool, labels (N,))`` over every pixel in order, ``-1`` for unlabeled.

    Labeled pixels other than ``ignore_index`` and unlabeled pixels other than padding are kept.
    """
    padding = resize_mask(padding, size)
    labels = torch.cat([resize_mask(masks, size), torch.full(padding.shape, -1, dtype=masks.dtype, device=masks.device)])
    keep = labels != ignore_index
    keep[masks.shape[0]:] &= ~padding
    return keep.flatten(), labels.flatten()


@host_side
def kept_pixel_index(
    masks: Tensor, padding: Tensor, size: torch.Size | tuple[int, int], ignore_index: int
) -> tuple[Tensor, Tensor]:
    """:func:`density_labels` in host memory, as indices: ``(index of the kept pixels, their labels)``."""
    keep, labels = density_labels(masks, padding, size, ignore_index)
    index = keep.nonzero().squeeze(1)
    return index, labels.index_select(0, index)


@torch.no_grad()
def relative_step(features: Tensor, perturbed: Tensor, valid: Tensor) -> Tensor:
    """Mean over trusted pixels with non-zero features of ``||perturbed - features|| / ||features||`` (0 without any).

    How far a perturbation moves the classifier input relative to the features' own size: the
    scale on which a fixed ``eps`` has to be judged. Pixels whose features are all zero (a dead
    ReLU map) have no relative size and are left out.

    The step computes it (``perturbation_relative_norm``) only on iterations that write a log line
    (:func:`~sandbox.train.log_window.is_log_step`): the logged value is that iteration's alone,
    not a mean over the steps of the log window as the other logged values are.

    Each norm is taken of the vector divided by its largest magnitude (then multiplied back), so
    that no square overflows float32: features or steps above ~1e19 (a plugin's runaway step) give
    their true ratio, not infinity. The difference is taken in float32, whatever the features' dtype.
    """
    size_scale, size = scaled_norm(features.float())
    step_scale, step = scaled_norm(perturbed.float() - features.float())
    counted = valid & (size_scale > 0)  # there the scaled size is at least 1
    ratio = (step_scale / size_scale.clamp(min=torch.finfo(torch.float32).tiny)) * (step / size.clamp(min=1.0))
    return torch.where(counted, ratio, 0.0).sum() / counted.sum().clamp(min=1)


def scaled_norm(values: Tensor) -> tuple[Tensor, Tensor]:
    """``(m, n)`` per pixel of ``values`` ``(B, C, h, w)``: ``m`` the largest magnitude over the channels and
    ``n`` the norm of the channels divided by ``m`` (0 where ``m`` is), so that the norm is ``m * n`` and no
    square overflows."""
    scale = values.abs().amax(dim=1)
    unit = (values / scale.clamp(min=torch.finfo(values.dtype).tiny).unsqueeze(1)).norm(dim=1)
    return scale, unit


@dataclass
class PseudoLabels:
    """The weak view's pseudo-labels (:meth:`SemiSupervisedStep.pseudo_labels`)."""

    probs: Tensor
    """Class probabilities ``(B, K, H, W)``."""
    trusted: Tensor
    """Trusted pixels ``(B, H, W)``: confident and not padding."""
    student_out: SegmentationOutput | None
    """The student's own pass A (labeled + weak images) when the student pseudo-labels; None with the teacher."""
    partner_probs: Tensor | None
    """The CutMix partners' probabilities (``cutmix_partners = "stream"``)."""


@dataclass
class StrongView:
    """One CutMixed strong view: images, their target probabilities, padding and trusted pixels."""

    images: Tensor
    probs: Tensor
    padding: Tensor
    trusted: Tensor


@dataclass
class PerturbedTarget:
    """What the perturbed view is held to (:meth:`SemiSupervisedStep.perturbed_target`)."""

    probs: Tensor
    trusted: Tensor
    padding: Tensor
    active: bool
    """The perturbation runs this step (``perturbation_start_iters`` reached)."""
    on_strong: bool
    """The perturbed view is the first strong view (else the weak view)."""


@dataclass
class PixelTotals:
    """The pixel counts the losses divide by (:meth:`SemiSupervisedStep.pixel_totals`): every
    process's summed, or this process's own with ``loss_pixel_count = "per_process"``."""

    labeled: Tensor
    """Labeled pixels (not ``ignore_index``)."""
    weak_pixels: Tensor
    """Non-padding pixels of the weak view, every process's summed in either mode (``trusted_ratio``)."""
    views: list[Tensor]
    """Each strong view's :meth:`~SemiSupervisedStep.loss_denominator`."""
    perturbed: Tensor
    """The perturbed view's :meth:`~SemiSupervisedStep.loss_denominator`."""


@dataclass
class StudentLogits:
    """The student's logits by role (:meth:`SemiSupervisedStep.student_pass`)."""

    labeled: Tensor
    by_view: list[Tensor]
    """One per strong view, in the order of the views."""
    perturbed: Tensor | None
    """The perturbed view's, None when no view was perturbed."""


class SemiSupervisedStep:
    """Computes the loss of one step: supervised warm-up, then mean teacher with a perturbed view."""

    def __init__(self, settings: TrainSection, method: MethodComponents, ignore_index: int, seed: int) -> None:
        self.settings = settings
        self.method = method
        self.ignore_index = ignore_index
        self.seed = seed
        self.skipped_density_updates: Tensor | int = 0
        """Density updates whose NLL was not finite since :meth:`take_skipped_density_updates` (a
        tensor on the device once counted: read it at logging intervals only)."""
        self.log_step = True
        """Whether the current iteration writes a log line (set by :meth:`semi_supervised`, read by
        :meth:`perturbation_hook`): what only a log line reads (``perturbation_relative_norm``) is
        computed on those iterations alone."""

    def take_skipped_density_updates(self) -> int:
        """The number of skipped density updates since the last call (and reset it); reads the device."""
        count, self.skipped_density_updates = self.skipped_density_updates, 0
        return int(count)

    def supervised(self, student: nn.Module, teacher: nn.Module, labeled: LabeledBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Warm-up: cross-entropy on labeled images only.

        With ``teacher_statistics = "own"`` the teacher also predicts the labeled images (no
        gradient), so that its BatchNorm running statistics are of clean images, as the reference.
        """
        if self.settings.teacher_statistics == "own":
            with torch.no_grad():
                teacher(labeled.images)
        logits = student(labeled.images).logits
        loss = self.supervised_loss(logits, labeled.masks, self.loss_counts(self.labeled_pixels(labeled)))
        return loss, {"loss": loss.detach(), "loss_sup": loss.detach()}

    @property
    def per_process(self) -> bool:
        """Whether each loss term is divided by this process's own pixel count (``loss_pixel_count``)."""
        return self.settings.loss_pixel_count == "per_process"

    def loss_counts(self, counts: Tensor) -> Tensor:
        """What the losses divide by, from this process's ``counts``: every process's summed (one
        all-reduce), or ``counts`` themselves with ``loss_pixel_count = "per_process"``."""
        return counts if self.per_process else sum_over_processes(counts)

    def loss_share(self, count: Tensor, total: Tensor) -> Tensor:
        """The factor that turns a mean over this process's ``count`` items into its part of a loss
        term divided by ``total`` (:meth:`loss_counts`).

        ``global``: :func:`~sandbox.processes.collectives.share_of_total`, this process's share of the mean over
        every process's items, times N to undo DDP's average of the processes' gradients: their
        average is one process's gradient on the concatenated batch. ``per_process``: ``count /
        total``, ``total`` this process's own (0 without items): this process's own mean, and DDP's
        average makes the effective loss the mean over processes of each process's mean."""
        if self.per_process:
            return count.float() / total.float().clamp(min=1.0)
        return share_of_total(count, total)

    def labeled_pixels(self, labeled: LabeledBatch) -> Tensor:
        """The number of labeled pixels (not ``ignore_index``) of this process's labeled batch."""
        return (labeled.masks != self.ignore_index).sum()

    def supervised_loss(self, logits: Tensor, masks: Tensor, total_pixels: Tensor) -> Tensor:
        """This process's part of the cross-entropy averaged over ``total_pixels`` labeled pixels
        (every process's, or its own: :meth:`loss_counts`, :meth:`loss_share`)."""
        summed = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index, reduction="sum")
        return summed * self.loss_share(torch.ones((), device=summed.device), total_pixels)

    def semi_supervised(
        self,
        step: int,
        student: nn.Module,
        teacher: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch,
        partners: UnlabeledBatch | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Pseudo-labels of the weak view, strong views CutMixed, the student's pass with a perturbed
        view, the weighted loss: each phase a method, in this order, for every framework.

        What differs between frameworks is chosen by recipe settings: ``pseudo_labels`` (EMA teacher
        or the student itself), ``strong_views`` (1 or 2), ``cutmix_partners`` (the batch, or the
        ``partners`` stream), ``perturbed_view`` (strong or weak), ``perturb_at`` (classifier input
        or encoder maps), the loss weights, ``unsupervised_normalisation`` and ``loss_pixel_count``.
        """
        logs: dict[str, Tensor] = {}
        self.log_step = is_log_step(step, self.settings)
        perturbing = step >= self.settings.perturbation_start_iters
        labels = self.pseudo_labels(student, teacher, labeled, unlabeled, partners, perturbing, logs)
        views = [
            StrongView(images, probs, padding, self.trusted(probs, padding))
            for images, probs, padding in self.mixed_strong_views(step, unlabeled, labels.probs, partners, labels.partner_probs)
        ]
        target = self.perturbed_target(perturbing, labels, unlabeled, views)
        totals = self.pixel_totals(labeled, unlabeled, labels, views, target)
        outputs = self.student_pass(student, labeled, unlabeled, labels, views, target, logs)
        loss = self.weighted_loss(labeled, labels, views, target, totals, outputs, logs)
        logs["loss"] = loss.detach()
        return loss, logs

    def pseudo_labels(
        self,
        student: nn.Module,
        teacher: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch,
        partners: UnlabeledBatch | None,
        perturbing: bool,
        logs: dict[str, Tensor],
    ) -> PseudoLabels:
        """The weak view's pseudo-labels (the teacher's, or the student's own train-mode pass A of
        labeled + weak images, perturbed there when the weak view is the perturbed one), the
        partners' (first: in eval mode, before any train-mode pass of this step), and one density update."""
        settings, num_labeled = self.settings, labeled.images.shape[0]
        if settings.pseudo_labels == "teacher":  # the mode it predicts in (an evaluation may have changed it)
            teacher.train(settings.teacher_mode == "train")
        stream = settings.cutmix_partners == "stream" and partners is not None
        partner_probs = self.partner_pseudo_labels(student, teacher, partners.weak) if stream else None
        if settings.pseudo_labels == "teacher":
            # the labeled images train the density, or (train mode) move the teacher's BatchNorm statistics;
            # else the eval-mode teacher predicts the weak view alone, as unimatch_v2.py
            with_labeled = self.method.density is not None or settings.teacher_mode == "train"
            with torch.no_grad():
                out = teacher(torch.cat([labeled.images, unlabeled.weak]) if with_labeled else unlabeled.weak)
                probs = out.logits[num_labeled if with_labeled else 0:].float().softmax(dim=1)
            if self.method.density is not None:
                logs.update(self.fit_density(out.embedding, labeled, unlabeled))
            return PseudoLabels(probs, self.trusted(probs, unlabeled.padding), None, partner_probs)
        weak_perturbed = settings.perturbed_view == "weak" and perturbing
        out = student(
            torch.cat([labeled.images, unlabeled.weak]),
            perturb=self.perturbation_hook(logs, None, unlabeled.padding) if weak_perturbed else None,
            num_perturbed=unlabeled.weak.shape[0],
            perturb_at=settings.perturb_at,
        )
        probs = out.logits[num_labeled:].detach().float().softmax(dim=1)
        trusted = self.trusted(probs, unlabeled.padding)
        if self.method.density is not None:  # one update behind: this pass's perturbation used the previous one
            logs.update(self.fit_density(out.embedding, labeled, unlabeled))
        return PseudoLabels(probs, trusted, out, partner_probs)

    def perturbed_target(
        self, perturbing: bool, labels: PseudoLabels, unlabeled: UnlabeledBatch, views: list[StrongView]
    ) -> PerturbedTarget:
        """What the perturbed view is held to: the first strong view's pseudo-labels when it is the
        perturbed one (``perturbed_view = "strong"``), else the weak view's."""
        if perturbing and self.settings.perturbed_view != "weak":
            return PerturbedTarget(views[0].probs, views[0].trusted, views[0].padding, active=True, on_strong=True)
        return PerturbedTarget(labels.probs, labels.trusted, unlabeled.padding, active=perturbing, on_strong=False)

    def pixel_totals(
        self,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch,
        labels: PseudoLabels,
        views: list[StrongView],
        target: PerturbedTarget,
    ) -> PixelTotals:
        """The pixel counts that the losses divide by, every process's summed in one all-reduce (this
        process's own with ``loss_pixel_count = "per_process"``; the weak view's pixels summed in either)."""
        counts = torch.stack([
            self.labeled_pixels(labeled),
            labels.trusted.sum(),
            (~unlabeled.padding).sum(),
            *[self.loss_denominator(view.trusted, view.padding) for view in views],
            self.loss_denominator(target.trusted, target.padding),
        ])
        totals = sum_over_processes(counts)
        divide = counts if self.per_process else totals
        return PixelTotals(labeled=divide[0], weak_pixels=totals[2], views=list(divide[3:-1]), perturbed=divide[-1])

    def student_pass(
        self,
        student: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch,
        labels: PseudoLabels,
        views: list[StrongView],
        target: PerturbedTarget,
        logs: dict[str, Tensor],
    ) -> StudentLogits:
        """The student's one pass (teacher pseudo-labels: labeled, the strong views with the first
        last, the weak view if perturbed) or its pass B (after pass A: the strong views), perturbed
        where the perturbed view is in it; its logits split by view."""
        settings, count = self.settings, unlabeled.weak.shape[0]
        by_teacher, weak_perturbed = labels.student_out is None, settings.perturbed_view == "weak"
        if settings.perturbed_view == "strong_in_place":
            return self.in_place_pass(student, labeled, labels, views, target.active, logs)
        strong = [view.images for view in views]
        order = [*strong[1:], strong[0]]
        if by_teacher:
            order = [labeled.images, *order] + ([unlabeled.weak] if weak_perturbed else [])
        perturb_here = target.active and (target.on_strong or by_teacher)  # else pass A perturbed the weak view
        out = student(
            torch.cat(order),
            perturb=self.perturbation_hook(logs, target.trusted, None) if perturb_here else None,
            num_perturbed=count,
            perturb_at=settings.perturb_at,
        )
        offset = labeled.images.shape[0] if by_teacher else 0
        chunks = out.logits[offset : offset + len(views) * count].split(count)  # views 1.., then view 0
        by_view = [chunks[-1], *chunks[:-1]]
        first = out if by_teacher else labels.student_out
        perturbed = labels.student_out.perturbed_logits if (not by_teacher and weak_perturbed) else out.perturbed_logits
        return StudentLogits(first.logits[: labeled.images.shape[0]], by_view, perturbed)

    def in_place_pass(
        self,
        student: nn.Module,
        labeled: LabeledBatch,
        labels: PseudoLabels,
        views: list[StrongView],
        perturbing: bool,
        logs: dict[str, Tensor],
    ) -> StudentLogits:
        """UniMatch V2's passes (``perturbed_view = "strong_in_place"``): the labeled images alone (or
        pass A's, with the student's pseudo-labels), then every strong view in one pass, perturbed in
        place (``views`` = their number, for a perturbation that pairs them)."""
        count = labeled.images.shape[0]
        labeled_logits = student(labeled.images).logits if labels.student_out is None else labels.student_out.logits[:count]
        images = torch.cat([view.images for view in views])
        valid = torch.cat([view.trusted for view in views])
        hook = self.perturbation_hook(logs, valid, None, views=len(views)) if perturbing else None
        out = student(images, perturb=hook, num_perturbed=images.shape[0], perturb_at=self.settings.perturb_at, in_place=True)
        return StudentLogits(labeled_logits, list(out.logits.split(views[0].images.shape[0])), None)

    def weighted_loss(
        self,
        labeled: LabeledBatch,
        labels: PseudoLabels,
        views: list[StrongView],
        target: PerturbedTarget,
        totals: PixelTotals,
        outputs: StudentLogits,
        logs: dict[str, Tensor],
    ) -> Tensor:
        """The supervised loss, the strong views' mean consistency loss and the perturbed view's, weighted."""
        settings = self.settings
        loss_sup = self.supervised_loss(outputs.labeled, labeled.masks, totals.labeled)
        strong_losses = [
            self.unlabeled_loss("strong_loss", logits, view.probs, view.trusted, total)
            for logits, view, total in zip(outputs.by_view, views, totals.views)
        ]
        loss_unsup = sum(strong_losses) / len(strong_losses)
        perturbed_view = outputs.perturbed is not None
        loss = settings.supervised_weight * loss_sup + settings.strong_weight(perturbed_view) * loss_unsup
        # trusted / non-padding pixels of the pseudo-labelled (weak) view, as this process's share
        trusted_ratio = share_of_total(labels.trusted.sum(), totals.weak_pixels)
        logs.update(loss_sup=loss_sup.detach(), loss_unsup=loss_unsup.detach(), trusted_ratio=trusted_ratio)
        if perturbed_view:
            loss_perturbed = self.unlabeled_loss("perturbed_loss", outputs.perturbed, target.probs, target.trusted, totals.perturbed)
            loss = loss + settings.perturbed_weight * loss_perturbed
            logs["loss_perturbed"] = loss_perturbed.detach()
        return loss

    def trusted(self, probs: Tensor, padding: Tensor) -> Tensor:
        """Pixels whose pseudo-label is trusted: confidence above ``threshold`` (or equal, with
        ``threshold_inclusive``) and not crop padding."""
        confidence = probs.max(dim=1).values
        settings = self.settings
        confident = confidence >= settings.threshold if settings.threshold_inclusive else confidence > settings.threshold
        return confident & ~padding

    def mixed_strong_views(
        self,
        step: int,
        unlabeled: UnlabeledBatch,
        probs: Tensor,
        partners: UnlabeledBatch | None,
        partner_probs: Tensor | None,
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(images, target probabilities, padding)`` of each strong view after CutMix.

        Partners are the next image of the batch, the image at the mirrored position
        (``cutmix_partners = "flipped"``), or the ``partners`` stream with their pseudo-labels
        ``partner_probs`` (see :meth:`partner_pseudo_labels`). Each view draws its own boxes.
        """
        settings = self.settings
        strong = [unlabeled.strong] + ([unlabeled.strong2] if settings.strong_views == 2 else [])
        if any(view is None for view in strong):
            raise ValueError("train.strong_views = 2 needs batches with a second strong view")
        count = unlabeled.weak.shape[0]
        stream = settings.cutmix_partners == "stream"
        if not stream and count < 2:  # one image has no partner to mix with (the loop warns at start)
            return [(view, probs, unlabeled.padding) for view in strong]
        if stream:
            if partners is None or partner_probs is None:
                raise ValueError("train.cutmix_partners = 'stream' needs a batch of partner images")
            partner_strong = [partners.strong] + ([partners.strong2] if settings.strong_views == 2 else [])
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        views = []
        for index, images in enumerate(strong):
            boxes = cutmix_boxes(
                count, *images.shape[-2:], settings.cutmix_p, generator, settings.cutmix_box, settings.cutmix_decision,
                device=images.device,
            )
            if stream:
                views.append((
                    paste(boxes, images, partner_strong[index]),
                    paste(boxes, probs, partner_probs),
                    paste(boxes, unlabeled.padding, partners.padding),
                ))
            else:
                flipped = settings.cutmix_partners == "flipped"
                views.append(tuple(apply_cutmix(boxes, images, probs, unlabeled.padding, flipped=flipped)))
        return views

    def partner_pseudo_labels(self, student: nn.Module, teacher: nn.Module, weak: Tensor) -> Tensor:
        """Probabilities of the partner images: the student in eval mode (UniMatch) or the teacher."""
        with torch.no_grad():
            if self.settings.pseudo_labels == "teacher":
                return teacher(weak).logits.float().softmax(dim=1)
            student.eval()
            try:
                return student(weak).logits.float().softmax(dim=1)
            finally:
                student.train()

    def perturbation_hook(
        self, logs: dict[str, Tensor], valid: Tensor | None, padding: Tensor | None, views: int = 1
    ) -> PerturbFn:
        """The ``perturb`` callback of the student's pass (:class:`~sandbox.train.student_pass.StudentPass`),
        running the recipe's perturbation.

        ``valid`` marks the trusted pixels of the perturbed images; None when they are only known
        inside the pass (the student's own pseudo-labels): they then come from the clean
        classifier output the network hands over (and ``padding``). On a log step (:attr:`log_step`
        when the hook is made) it also logs ``perturbation_relative_norm`` (:func:`relative_step`).
        ``views``: :attr:`~sandbox.api.PerturbationContext.views`. At the encoder the hook receives the
        list of maps and calls the plugin's ``perturb_maps``.
        """
        method, log_step = self.method, self.log_step

        def perturb(
            features: Tensor | list[Tensor], classify: Callable[[Tensor], ClassifierOutput], clean: ClassifierOutput | None
        ) -> Tensor | list[Tensor] | None:
            label = method.label("perturbation")
            if isinstance(features, list):  # the encoder's maps of every image of the pass: no pseudo-label mask
                first = features[0]
                trusted = torch.ones(first.shape[0], *first.shape[-2:], dtype=torch.bool, device=first.device)
                context = PerturbationContext(classify, trusted, method.density, views)
                with blame(label, "perturb_maps"):
                    moved = method.perturbation.perturb_maps(features, context)
                    if moved is None:
                        return None
                    if len(moved) != len(features):
                        raise ValueError(f"returned {len(moved)} maps for {len(features)}")
                    return [check_perturbed(label, f, m) for f, m in zip(features, moved)]
            if valid is not None:
                trusted = resize_mask(valid, features.shape[-2:])
            else:  # the student's own pseudo-labels, known inside the pass: from its clean output
                assert clean is not None and padding is not None
                trusted = self.trusted(clean.logits.detach().float().softmax(dim=1), resize_mask(padding, features.shape[-2:]))
            context = PerturbationContext(classify, trusted, method.density, views)
            with blame(label, "forward"):
                perturbed = check_perturbed(label, features, method.perturbation(features, context))
            if perturbed is not None and log_step:
                logs["perturbation_relative_norm"] = relative_step(features, perturbed, context.valid)
            return perturbed

        return perturb

    def loss_denominator(self, valid: Tensor, padding: Tensor) -> Tensor:
        """What an unlabeled loss is divided by (this process's part, per ``unsupervised_normalisation``):
        its trusted pixels (DDFP's reference) or its non-padding pixels (UniMatch)."""
        return (~padding).sum() if self.settings.unsupervised_normalisation == "image_pixels" else valid.sum()

    def unlabeled_loss(self, role: str, logits: Tensor, target_probs: Tensor, valid: Tensor, total: Tensor) -> Tensor:
        """This process's part of the consistency loss in ``role``: summed over the trusted pixels and
        divided by ``total``, every process's :meth:`loss_denominator` summed (or this process's own:
        :meth:`loss_counts`, :meth:`loss_share`).

        The plugin returns the mean over this process's trusted pixels; times their count it is their sum.
        """
        loss = self.consistency(role, logits, target_probs, valid)
        return loss * self.loss_share(valid.sum(), total)

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

    def fit_density(self, embedding: Tensor, labeled: LabeledBatch, unlabeled: UnlabeledBatch) -> dict[str, Tensor | float]:
        """One estimator update on the pixel features of labeled (with their class) and weak unlabeled
        images (as the mixture); its logged values, prefixed ``density_``.

        The kept pixels are found in host memory (the batches' host copies) and gathered on the
        device by index: nothing waits for the device. Without host copies, the masks on the device
        select them (a synchronisation). A non-finite NLL (the estimator skipped its update) is
        counted in :attr:`skipped_density_updates`; its logged values are then left out of their means.
        """
        assert self.method.density is not None
        size, device = embedding.shape[-2:], embedding.device
        pixels = embedding.detach().permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
        if labeled.host_masks is not None and unlabeled.host_padding is not None:
            index, labels = kept_pixel_index(labeled.host_masks, unlabeled.host_padding, size, self.ignore_index)
            index, labels = to_device(index, device), to_device(labels, device)
            pixels = pixels.index_select(0, index)
        else:
            keep, labels = density_labels(labeled.masks, unlabeled.padding, size, self.ignore_index)
            pixels, labels = pixels[keep], labels[keep]
        label = self.method.label("density")
        with blame(label, "fit_step"):
            stats = check_density_stats(label, self.method.density.fit_step(pixels.float(), labels))
        nll = stats.get("nll")
        if nll is not None:
            finite = torch.isfinite(torch.as_tensor(nll, device=device))
            self.skipped_density_updates = self.skipped_density_updates + (~finite).int()
            if "accuracy" in stats:  # no accuracy of an update that was not made
                stats["accuracy"] = torch.where(finite, torch.as_tensor(stats["accuracy"], device=device), torch.nan)
        return {f"density_{key}": value for key, value in stats.items()}
