"""The public API that plugins build on: the hook marker and the component types.

A plugin module imports only this module and torch (a density estimator may build on
``sandbox.density``); the built-in plugins in ``plugins/`` do exactly the same. See ``sandbox.hookspecs`` for the hooks themselves.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import pluggy
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.host_side import to_device

PROJECT_NAME = "sandbox"
IGNORE_INDEX = 255

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Decorator marking a function of a plugin module as the implementation of a sandbox hook."""


class Register(Protocol):
    """The callback a registration hook receives: ``register(name, factory, description=None)``.

    ``factory`` is a class or function; its keyword parameters are the options a recipe may set
    (their defaults are the recipe defaults). ``description`` defaults to the first line of the
    factory's docstring.
    """

    def __call__(self, name: str, factory: Callable[..., Any], description: str | None = None) -> None:
        """Register ``factory`` under ``name``."""


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


@dataclass
class SegmentationSource:
    """What a dataset plugin's factory returns: the three parts of a semi-supervised set.

    Images are ``uint8`` tensors of shape ``(3, H, W)``; masks are ``int64`` tensors of shape
    ``(H, W)`` holding class indices, with ``ignore_index`` for pixels without a label.
    ``labeled`` and ``val`` are sequences of ``(image, mask)`` pairs, ``unlabeled`` a sequence
    of images. Sequences only need ``__len__`` and ``__getitem__`` and may load lazily.
    """

    num_classes: int
    class_names: list[str]
    labeled: Sequence[tuple[Tensor, Tensor]]
    unlabeled: Sequence[Tensor]
    val: Sequence[tuple[Tensor, Tensor]]
    ignore_index: int = IGNORE_INDEX
    palette: list[tuple[int, int, int]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------


class Backbone(nn.Module, abc.ABC):
    """An encoder returning ``(low_level, high_level)`` feature maps.

    ``low_level`` has stride 4 and ``low_channels`` channels; ``high_level`` has stride
    ``output_stride`` (16 for DeepLabV3+) and ``high_channels`` channels.
    """

    low_channels: int
    high_channels: int
    output_stride: int

    @abc.abstractmethod
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Encode normalised images ``(B, 3, H, W)`` into ``(low_level, high_level)``."""


# ----------------------------------------------------------------------------------------------
# Density estimators
# ----------------------------------------------------------------------------------------------


class DensityEstimator(nn.Module, abc.ABC):
    """A density over per-pixel feature vectors, trained online by the host.

    The host constructs it with ``feature_dim``, ``num_classes`` and ``total_steps`` (the number
    of updates it will receive) besides the recipe's options. It owns its optimizer and
    schedule: :meth:`fit_step` makes one update. Its whole state, optimizer included, goes
    through :meth:`checkpoint_state` / :meth:`load_checkpoint_state`.
    """

    @abc.abstractmethod
    def log_prob(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """Log density of ``features`` ``(N, D)``, shape ``(N,)``.

        With ``labels`` ``(N,)``, a labeled feature uses its class's component alone; a label
        of ``-1`` (or ``labels=None``) means unlabeled: the mixture over all classes.
        """

    @abc.abstractmethod
    def fit_step(self, features: Tensor, labels: Tensor) -> dict[str, float]:
        """Make one optimizer update on detached ``features`` ``(N, D)`` with ``labels`` ``(N,)``
        (``-1`` = unlabeled) and return scalar diagnostics (at least ``"nll"``)."""

    def optimizer_state(self) -> dict[str, Any]:
        """State of the estimator's own optimizer and schedule (empty if it has none)."""
        return {}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`optimizer_state` returned."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to resume: parameters, buffers and optimizer state.

        Tensors, containers and primitives only: a resume reads checkpoints with ``weights_only=True``.
        """
        return {"module": self.state_dict(), "optimizer": self.optimizer_state()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned."""
        self.load_state_dict(state["module"])
        self.load_optimizer_state(state["optimizer"])


# ----------------------------------------------------------------------------------------------
# Perturbations
# ----------------------------------------------------------------------------------------------


class ClassifierOutput(NamedTuple):
    """What the model's classifier returns for a feature map."""

    logits: Tensor
    """Class scores ``(B, num_classes, h, w)`` at the feature map's resolution."""
    embedding: Tensor
    """The classifier's last hidden features ``(B, D, h, w)`` on which densities are estimated."""


@dataclass
class PerturbationContext:
    """What a perturbation may use besides the features it perturbs.

    ``classify`` runs the model's classifier (with its auxiliary BatchNorm statistics) on a
    feature map of the same shape as the perturbed features. ``valid`` marks the pixels
    ``(B, h, w)`` whose pseudo-label is trusted. ``density`` is the online density estimator,
    or ``None`` when the recipe's perturbation does not use one.
    """

    classify: Callable[[Tensor], ClassifierOutput]
    valid: Tensor
    density: DensityEstimator | None = None
    views: int = 1
    """The perturbed images are ``views`` equal groups along the batch, image ``i`` of every group a
    view of the same unlabeled image (2 for the two strong views perturbed in place, UniMatch V2's
    step, ``train.perturbed_view = "strong_in_place"``): a perturbation may pair them (complementary
    channel dropout). 1 otherwise."""


class Perturbation(nn.Module, abc.ABC):
    """A feature perturbation: maps the classifier's input features to perturbed features.

    Set ``uses_density = True`` to receive a trained density estimator in the context (the host
    then trains one online). Returning ``None`` means "no perturbed view": the host drops the
    perturbed-view loss for that step.
    """

    uses_density: bool = False

    @abc.abstractmethod
    def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
        """Return perturbed ``features`` ``(B, C, h, w)`` (gradients may flow through them)."""

    def perturb_maps(self, maps: list[Tensor], context: PerturbationContext) -> list[Tensor] | None:
        """Perturb the encoder's maps of one pass together (``train.perturb_at = "encoder"``).

        The default perturbs each map alone with :meth:`forward`, in order (None if any is None).
        Override it to relate the maps, e.g. one channel mask for all of them (UniMatch V2).
        """
        moved = [self(feature_map, context) for feature_map in maps]
        return None if any(m is None for m in moved) else moved


# ----------------------------------------------------------------------------------------------
# Segmentation networks
# ----------------------------------------------------------------------------------------------


class DualBatchNorm2d(nn.Module):
    """A BatchNorm with a main and an auxiliary set of statistics and affine parameters ("Mix BN")."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.BatchNorm2d(channels)
        self.auxiliary = nn.BatchNorm2d(channels)
        self.use_auxiliary = False

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with the auxiliary statistics while ``use_auxiliary`` is set."""
        return self.auxiliary(x) if self.use_auxiliary else self.main(x)


def classifier_layers(
    in_channels: int, channels: int, layers: int, dropout: float = 0.1, mix_bn: bool = True
) -> nn.Sequential:
    """``layers`` x (3x3 conv, BatchNorm, ReLU, Dropout2d): the hidden part of a classifier.

    With ``mix_bn`` the BatchNorms are :class:`DualBatchNorm2d` (the perturbed view normalises
    with its own statistics). DDFP's DeepLabV3+ classifier is ``classifier_layers(304, 256, 2)``.
    """
    norm: Callable[[int], nn.Module] = DualBatchNorm2d if mix_bn else nn.BatchNorm2d
    modules: list[nn.Module] = []
    for index in range(layers):
        modules += [
            nn.Conv2d(in_channels if index == 0 else channels, channels, 3, padding=1, bias=False),
            norm(channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        ]
    return nn.Sequential(*modules)


class SegmentationOutput(NamedTuple):
    """What a segmentation network's forward pass returns."""

    logits: Tensor
    """``(B, K, H, W)`` at the input size."""
    embedding: Tensor
    """``(B, D, h, w)``: the classifier's last hidden features, where densities are estimated."""
    perturbed_logits: Tensor | None
    """Logits of the perturbed view ``(B_p, K, H, W)``, or None without a perturbation."""


PerturbFn = Callable[
    ["Tensor | list[Tensor]", Callable[[Tensor], ClassifierOutput], "ClassifierOutput | None"], "Tensor | list[Tensor] | None"
]
"""``perturb(features, classify_auxiliary, clean) -> perturbed features or None``; at the encoder,
``features`` is the list of the encoder's maps and the result a list (see
``sandbox.train.student_pass.StudentPass.forward``)."""


def upsample(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear upsampling (align_corners=True, as DDFP's reference) to ``size``."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


class SegmentationNetwork(nn.Module, abc.ABC):
    """A segmentation network as the training step sees it, whatever its architecture.

    One definition for every architecture (DDFP.md's DeepLabV3+ is one instance):

    - :meth:`encode` maps normalised images to the *features*: the decoder's output, the
      classifier's input, ``(B, feature_channels, h, w)``. The perturbation moves these.
    - ``classifier`` (a module, e.g. :func:`classifier_layers`) maps features to the
      *embedding* ``(B, embedding_channels, h, w)``, on which densities are estimated; its
      BatchNorms are :class:`DualBatchNorm2d` for Mix BN (the perturbed view uses the auxiliary
      statistics). ``final`` (a 1x1 conv) maps the embedding to class scores.
    - :meth:`forward` returns logits at the input size (bilinear upsampling) and the embedding.
      The student's training pass (the perturbed view routed through the auxiliary statistics,
      encoder-map perturbations, the DDP tie) is composed by the host from these parts.

    ``size_divisor``: input sides must be multiples of it (a stride-32 encoder: 32; a patch-14
    ViT under DPT: 28). Training crops must be (the host checks); other inputs are padded on the
    bottom/right to the next multiple and the logits cropped back.
    """

    feature_channels: int
    embedding_channels: int
    size_divisor: int = 1
    classifier: nn.Module
    final: nn.Module

    @abc.abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """The classifier's input features ``(B, feature_channels, h, w)`` of images ``(B, 3, H, W)``."""

    def extract(self, images: Tensor) -> list[Tensor]:
        """The encoder's feature maps, before the decoder (``train.perturb_at = "encoder"`` perturbs these).

        Optional: a network that implements it also implements :meth:`decode`, with
        ``encode(images) == decode(extract(images))``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not expose its encoder's feature maps (extract/decode): "
            "perturb at the classifier's input (train.perturb_at = 'classifier')"
        )

    def decode(self, maps: list[Tensor]) -> Tensor:
        """The classifier's input features from :meth:`extract`'s maps."""
        raise NotImplementedError(f"{type(self).__name__} does not implement decode")

    def has_encoder_maps(self) -> bool:
        """Whether :meth:`extract`/:meth:`decode` exist (``train.perturb_at = "encoder"`` needs them)."""
        return type(self).extract is not SegmentationNetwork.extract

    @abc.abstractmethod
    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the (pretrained) encoder, trained at the base learning rate."""

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the encoder (trained at the head learning rate)."""
        encoder = {id(p) for p in self.encoder_parameters()}
        return [p for p in self.parameters() if id(p) not in encoder]

    def forward(self, images: Tensor) -> SegmentationOutput:
        """Predict ``images`` (evaluation, the teacher): logits at the input size and the embedding.

        Inputs whose sides are not multiples of ``size_divisor`` are padded on the bottom/right and
        the logits cropped back. The student's training pass (perturbed view, Mix BN, the DDP tie)
        is the host's, composed from ``encode``, ``classifier`` and ``final``
        (``sandbox.train.student_pass``): a network need not, and cannot, change it here.
        """
        size = images.shape[-2:]
        padded = pad_to_multiple(images, self.size_divisor)
        embedding = self.classifier(self.encode(padded))
        logits = upsample(self.final(embedding), padded.shape[-2:])[..., : size[0], : size[1]]
        return SegmentationOutput(logits, embedding, None)


def pad_to_multiple(images: Tensor, divisor: int) -> Tensor:
    """``images`` padded with zeros on the bottom/right so that both sides are multiples of ``divisor``."""
    height, width = images.shape[-2:]
    bottom, right = -height % divisor, -width % divisor
    return F.pad(images, (0, right, 0, bottom)) if bottom or right else images


# ----------------------------------------------------------------------------------------------
# Consistency losses
# ----------------------------------------------------------------------------------------------


class ConsistencyLoss(nn.Module, abc.ABC):
    """A loss between student logits and teacher probabilities on trusted pixels."""

    @abc.abstractmethod
    def forward(self, logits: Tensor, target_probs: Tensor, valid: Tensor) -> Tensor:
        """Scalar loss for ``logits`` and ``target_probs`` ``(B, K, H, W)`` averaged over the
        trusted pixels (``valid`` ``(B, H, W)``); see :func:`masked_mean`."""


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of per-pixel ``values`` over the ``valid`` pixels (0 when none is valid).

    This is what cross-entropy with pseudo-labels set to the ignore index computes.
    """
    weights = valid.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


__all__ = [
    "IGNORE_INDEX",
    "PROJECT_NAME",
    "Backbone",
    "ClassifierOutput",
    "ConsistencyLoss",
    "DensityEstimator",
    "DualBatchNorm2d",
    "Perturbation",
    "PerturbFn",
    "PerturbationContext",
    "Register",
    "SegmentationNetwork",
    "SegmentationOutput",
    "SegmentationSource",
    "classifier_layers",
    "pad_to_multiple",
    "upsample",
    "to_device",
    "hookimpl",
    "masked_mean",
]
