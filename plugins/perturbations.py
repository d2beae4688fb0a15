"""Perturbation plugins: density-descending (DDFP), UniMatch-style feature dropout, none."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.api import Perturbation, PerturbationContext, Register, hookimpl


class DensityDescending(Perturbation):
    """Move features along the gradient of the flow NLL, towards lower density (DDFP)."""

    uses_density = True

    def __init__(self, eps: float = 4.0) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
        """``features + eps * g / ||g||`` per pixel, g = d NLL(classifier(features + noise)) / d noise."""
        if context.density is None:
            raise RuntimeError("the ddfp perturbation needs a density estimator in its context")
        delta = self.direction(features.detach(), context) * self.eps
        return features + delta.to(features.dtype)

    def direction(self, features: Tensor, context: PerturbationContext) -> Tensor:
        """Unit-norm (per pixel, over channels) ascent direction of the NLL of the trusted pixels."""
        noise = torch.zeros_like(features, requires_grad=True)
        with torch.enable_grad():
            embedding = context.classify(features + noise).embedding
            pixels = embedding.permute(0, 2, 3, 1)[context.valid]
            if pixels.shape[0] == 0:
                return torch.zeros_like(features)
            nll = -context.density.log_prob(pixels.float()).mean()
            (grad,) = torch.autograd.grad(nll, noise)
        return F.normalize(grad.float(), dim=1, eps=1e-12)


class FeatureDropout(Perturbation):
    """Channel dropout on the classifier's input features (UniMatch's feature perturbation)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.dropout = nn.Dropout2d(p)

    def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
        """Zero whole channels with probability ``p`` (survivors scaled by 1/(1-p))."""
        return self.dropout(features)


class NoPerturbation(Perturbation):
    """No perturbed view: plain mean teacher (the baseline)."""

    def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
        """Return None: the host drops the perturbed-view loss."""
        return None


@hookimpl
def sandbox_register_perturbations(register: Register) -> None:
    """Register the built-in perturbations."""
    register("ddfp", DensityDescending)
    register("dropout", FeatureDropout)
    register("none", NoPerturbation)
