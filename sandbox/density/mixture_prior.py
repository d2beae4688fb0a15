"""A FlowGMM-style prior: equal-weight mixture of unit-variance Gaussians with learnable means.

Squared distances to the means are computed as ``|z|^2 - 2 z.mu^T + |mu|^2`` (one matmul), the
same function as the naive ``N x K x D`` difference tensor at a fraction of the memory and time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GaussianMixturePrior(nn.Module):
    """K diagonal unit-variance Gaussians in D dimensions, learnable means, equal weights.

    A labeled point (label ``>= 0``) is scored by its class's component alone,
    ``log N(z; mu_y, I)`` (no ``log(1/K)`` term, as in the DDFP reference); an unlabeled one
    (label ``-1``, or no labels) by the mixture ``logsumexp_k(log N(z; mu_k, I) + log(1/K))``.
    """

    def __init__(self, num_components: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if num_components < 1 or dim < 1:
            raise ValueError(f"need at least one component and one dimension, got K={num_components}, D={dim}")
        self.num_components = num_components
        self.dim = dim
        self.means = nn.Parameter(torch.randn(num_components, dim, generator=generator))

    def component_log_probs(self, z: Tensor) -> Tensor:
        """``log N(z_n; mu_k, I)`` for every point and component, shape ``(N, K)``."""
        means = self.means.to(z.dtype)
        norms = z.pow(2).sum(dim=1, keepdim=True) + means.pow(2).sum(dim=1)
        squared_distances = torch.addmm(norms, z, means.t(), alpha=-2.0)
        return -0.5 * squared_distances - 0.5 * self.dim * math.log(2.0 * math.pi)

    def combine(self, component_log_probs: Tensor, labels: Tensor | None = None) -> Tensor:
        """Per-point log density ``(N,)`` from :meth:`component_log_probs` and optional labels."""
        mixture = torch.logsumexp(component_log_probs, dim=1) - math.log(self.num_components)
        if labels is None:
            return mixture
        labeled = labels >= 0
        own = component_log_probs.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        return torch.where(labeled, own, mixture)

    def log_prob(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Log density of ``z`` ``(N, D)``, shape ``(N,)``; ``labels`` ``(N,)`` with ``-1`` = unlabeled."""
        return self.combine(self.component_log_probs(z), labels)

    def classify(self, z: Tensor) -> Tensor:
        """The most probable component of each point (FlowGMM classification), shape ``(N,)``."""
        return self.component_log_probs(z).argmax(dim=1)
