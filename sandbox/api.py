"""The public API that plugins build on: the hook marker and the component types.

A plugin module imports only this module and torch (a density estimator may build on
``sandbox.density``); the built-in plugins in ``plugins/`` do exactly the same. See ``sandbox.hookspecs`` for the hooks themselves.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import pluggy
from torch import Tensor, nn

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
    "Perturbation",
    "PerturbationContext",
    "Register",
    "SegmentationSource",
    "hookimpl",
    "masked_mean",
]
