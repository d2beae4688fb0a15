"""Density estimator plugin "gmm": a class-conditional diagonal Gaussian mixture over the features.

No flow: class ``k`` is ``N(x; mu_k, diag sigma_k^2)`` directly in feature space, with learnable
means and log-variances and equal weights. Labeled/unlabeled semantics, the training protocol
(gradient descent with Adam, see :mod:`sandbox.density.online`) and the posterior-accuracy
diagnostic are those of "glow", so it is a drop-in baseline for the flow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sandbox.density import (
    GaussianMixturePrior,
    OnlineMixtureDensity,
    require_positive,
    sum_over_processes,
)
from sandbox.api import Register, hookimpl


@hookimpl
def sandbox_register_density_estimators(register: Register) -> None:
    """Register the diagonal Gaussian mixture as ``gmm``."""
    register("gmm", GaussianMixtureDensity)


FALLBACK_SEED = 0
"""Seeds the N(0, I) draw that places the initial means of classes without labeled features."""


class DiagonalGaussianMixture(GaussianMixturePrior):
    """K diagonal Gaussians in D dimensions with learnable means and log-variances, equal weights.

    Labeled/unlabeled combination and classification are :class:`GaussianMixturePrior`'s. The
    quadratic form ``sum_d (x_d - mu_kd)^2 / sigma_kd^2`` is expanded into
    ``x^2 . (1/sigma_k^2) - 2 x . (mu_k/sigma_k^2) + sum_d mu_kd^2/sigma_kd^2`` (two matmuls, no
    ``N x K x D`` tensor), after centring ``x`` and the means on the means' average, which is
    the same function with less float32 cancellation.
    """

    def __init__(self, num_components: int, dim: int, init_scale: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(num_components, dim, generator=generator)
        with torch.no_grad():
            self.means.mul_(init_scale)
        self.log_vars = nn.Parameter(torch.zeros(num_components, dim))

    def component_log_probs(self, z: Tensor) -> Tensor:
        """``log N(z_n; mu_k, diag exp(log_vars_k))`` for every point and component, shape ``(N, K)``."""
        means, log_vars = self.means.to(z.dtype), self.log_vars.to(z.dtype)
        center = means.detach().mean(dim=0)
        z, means = z - center, means - center
        precision = torch.exp(-log_vars)
        scaled_means = means * precision
        constant = (means * scaled_means).sum(dim=1) + log_vars.sum(dim=1) + self.dim * math.log(2.0 * math.pi)
        quadratic = torch.addmm(constant, z.pow(2), precision.t())
        quadratic = torch.addmm(quadratic, z, scaled_means.t(), alpha=-2.0)
        return -0.5 * quadratic

    @torch.no_grad()
    def initialize_from(self, features: Tensor, labels: Tensor) -> bool:
        """Moment initialisation from a batch: class means and the pooled within-class variance.

        A class without labeled features gets a random point of the batch's spread as its mean:
        batch mean + batch standard deviation x a fixed N(0, I) draw (seeded by
        :data:`FALLBACK_SEED`, so the same however many processes share the batch).
        The per-dimension variance, shared by all components, is the pooled within-class
        variance of the labeled features, or the batch's variance when no class has two
        labeled features. Variances are floored at 1e-6.

        On several processes every process calls this at the same step with its own pixels: the
        moments are summed over all processes' pixels, so every process ends with the parameters
        that one process computes from all the pixels. Returns False
        (and changes nothing) when no process has a pixel.
        """
        features = features.to(self.means.dtype)
        count, num_components = features.shape[0], self.num_components
        labeled = labels >= 0
        classes, labeled_features = labels[labeled], features[labeled]
        sums = features.new_zeros(num_components, self.dim).index_add_(0, classes, labeled_features)
        counts = torch.bincount(classes, minlength=num_components).to(features.dtype)
        moments = sum_over_processes(torch.cat([sums.reshape(-1), counts, features.sum(dim=0), features.new_tensor([count])]))
        sums, counts, feature_sum, total = moments.split([num_components * self.dim, num_components, self.dim, 1])
        sums, counts, total = sums.view(num_components, self.dim), counts.unsqueeze(1), int(total)
        if total == 0:
            return False
        batch_mean = feature_sum / total
        means = torch.where(counts > 0, sums / counts.clamp(min=1.0), batch_mean)  # fallbacks placed below
        # Squared deviations from the global means, summed over every process (a second pass: the
        # one-pass E[x^2] - E[x]^2 loses its digits to cancellation when the mean is large)
        spread = sum_over_processes(torch.cat([
            (features - batch_mean).pow(2).sum(dim=0), (labeled_features - means[classes]).pow(2).sum(dim=0)
        ]))
        batch_squares, deviations = spread.split([self.dim, self.dim])
        batch_std = (batch_squares / total).sqrt()
        draw = torch.randn(num_components, self.dim, generator=torch.Generator().manual_seed(FALLBACK_SEED))
        fallback = batch_mean + batch_std * draw.to(device=features.device, dtype=features.dtype)
        means = torch.where(counts > 0, means, fallback)
        degrees_of_freedom = int(counts.sum()) - int((counts > 0).sum())
        if degrees_of_freedom > 0:
            variance = deviations / degrees_of_freedom
        elif total > 1:
            variance = batch_squares / (total - 1)
        else:
            variance = torch.ones_like(means[0])
        self.means.copy_(means)
        self.log_vars.copy_(variance.clamp(min=1e-6).log().expand_as(self.log_vars))
        return True


class GaussianMixtureDensity(OnlineMixtureDensity):
    """Class-conditional diagonal Gaussian mixture over the features (no flow), trained online.

    ``log p(x | y) = log N(x; mu_y, diag sigma_y^2)`` for a labeled feature; the equal-weight
    mixture ``logsumexp_k(log N(x; mu_k, diag sigma_k^2) + log(1/K))`` for an unlabeled one.
    Means start N(0, ``init_scale``^2 I) and log-variances 0; with ``data_init`` the first
    :meth:`fit_step` with pixels (on any process) first sets them from that batch
    (:meth:`DiagonalGaussianMixture.initialize_from`), then updates. Training by gradient
    descent as "glow": at most ``sampled_pixels`` pixels per step with N(0, ``input_noise``^2)
    noise, Adam (``lr``, ``betas``), gradient norm clipped to ``grad_clip``, learning rate
    decayed exponentially to ``lr * final_lr_ratio`` over ``total_steps`` updates.
    """

    initialized: Tensor

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        total_steps: int,
        data_init: bool = True,
        init_scale: float = 1.0,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.5, 0.9),
        grad_clip: float = 50.0,
        final_lr_ratio: float = 0.01,
        sampled_pixels: int = 20480,
        input_noise: float = 0.05,
    ) -> None:
        super().__init__()
        require_positive(feature_dim=feature_dim, num_classes=num_classes)
        self.data_init = data_init
        self.prior = DiagonalGaussianMixture(num_classes, feature_dim, init_scale)
        self.register_buffer("initialized", torch.tensor(not data_init))
        self._initialized_known: bool | None = not data_init
        """``initialized`` as known in host memory (None: read it from the buffer)."""
        self.configure_training(total_steps, lr, betas, grad_clip, final_lr_ratio, sampled_pixels, input_noise)

    def component_scores(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(log N(x; mu_k, diag sigma_k^2) (N, K), zeros (N,))``: no change of variables."""
        return self.prior.component_log_probs(features), features.new_zeros(features.shape[0])

    def fit_step(self, features: Tensor, labels: Tensor) -> dict[str, Tensor | float]:
        """As :meth:`OnlineMixtureDensity.fit_step`, after the data initialisation if still due."""
        if not self._is_initialized() and self.prior.initialize_from(features.detach(), labels.detach()):
            self.initialized.fill_(True)
            self._initialized_known = True
        return super().fit_step(features, labels)

    def _is_initialized(self) -> bool:
        """The ``initialized`` buffer, read from the device once (then known here until a state is loaded)."""
        if self._initialized_known is None:
            self._initialized_known = bool(self.initialized)
        return self._initialized_known

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._initialized_known = None  # the loaded buffer decides
