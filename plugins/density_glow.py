"""Density estimator plugin "glow": a GLOW affine-coupling flow with a Gaussian-mixture prior.

This is DDFP's online density model (FlowGMM-style): ``blocks`` x [GLOW coupling, fixed random
permutation] maps a pixel feature ``x`` to ``z``; ``log p(x) = log p_prior(z) + log|det dz/dx|``.
The layers follow FrEIA 0.2's ``GLOWCouplingBlock`` (ATAN soft clamp) and ``PermuteRandom``
semantics exactly, so weights map one-to-one onto a FrEIA ``SequenceINN`` (see the tests).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from sandbox.density import GaussianMixturePrior, OnlineMixtureDensity, require_positive
from sandbox.api import Register, hookimpl


@hookimpl
def sandbox_register_density_estimators(register: Register) -> None:
    """Register the GLOW flow with a Gaussian-mixture prior as ``glow``."""
    register("glow", GlowFlowDensity)


def mlp(in_features: int, hidden: int, out_features: int, hidden_layers: int) -> nn.Sequential:
    """``Linear(in, hidden)-ReLU-[Linear(hidden, hidden)-ReLU]*(hidden_layers-1)-Linear(hidden, out)``."""
    layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, out_features))
    return nn.Sequential(*layers)


class GlowCoupling(nn.Module):
    """GLOW affine coupling (FrEIA ``GLOWCouplingBlock`` semantics, ATAN clamp).

    ``x = [x1, x2]``; ``y1 = exp(s2) * x1 + t2`` with ``[s2, t2] = subnet2(x2)``, then
    ``y2 = exp(s1) * x2 + t1`` with ``[s1, t1] = subnet1(y1)``; raw scales are soft-clamped as
    ``clamp * 0.636 * atan(s)`` and ``log|det J| = sum(s1) + sum(s2)``.
    """

    def __init__(self, dim: int, hidden: int, clamp: float, hidden_layers: int = 1) -> None:
        super().__init__()
        self.split1 = round(dim * 0.5)  # as FrEIA's split_len=0.5
        self.split2 = dim - self.split1
        self.clamp = clamp
        self.subnet1 = mlp(self.split1, hidden, 2 * self.split2, hidden_layers)
        self.subnet2 = mlp(self.split2, hidden, 2 * self.split1, hidden_layers)

    def _scale_shift(self, subnet: nn.Module, condition: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """Soft-clamped log-scale and shift for a half of ``width`` channels."""
        params = subnet(condition)
        log_scale = self.clamp * 0.636 * torch.atan(params[:, :width])
        return log_scale, params[:, width:]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``x`` ``(N, D)`` to ``(y, log|det J|)``."""
        x1, x2 = x[:, : self.split1], x[:, self.split1 :]
        s2, t2 = self._scale_shift(self.subnet2, x2, self.split1)
        y1 = torch.exp(s2) * x1 + t2
        s1, t1 = self._scale_shift(self.subnet1, y1, self.split2)
        y2 = torch.exp(s1) * x2 + t1
        return torch.cat((y1, y2), dim=1), s1.sum(dim=1) + s2.sum(dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        """Invert :meth:`forward`."""
        y1, y2 = y[:, : self.split1], y[:, self.split1 :]
        s1, t1 = self._scale_shift(self.subnet1, y1, self.split2)
        x2 = (y2 - t1) * torch.exp(-s1)
        s2, t2 = self._scale_shift(self.subnet2, x2, self.split1)
        x1 = (y1 - t2) * torch.exp(-s2)
        return torch.cat((x1, x2), dim=1)


class FixedPermutation(nn.Module):
    """A fixed random channel permutation (FrEIA ``PermuteRandom`` semantics: numpy, seeded)."""

    perm: Tensor
    perm_inv: Tensor

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        perm = torch.from_numpy(np.random.RandomState(seed).permutation(dim)).long()
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def forward(self, x: Tensor) -> Tensor:
        """``x[:, perm]``."""
        return x[:, self.perm]

    def inverse(self, y: Tensor) -> Tensor:
        """``y[:, perm_inv]``."""
        return y[:, self.perm_inv]


class GlowFlowDensity(OnlineMixtureDensity):
    """GLOW affine-coupling flow with a Gaussian-mixture prior, trained online (DDFP).

    Options: ``blocks`` coupling+permutation blocks whose subnets are MLPs with ``hidden_layers``
    hidden layers of width ``hidden`` (the DDFP reference: 2 x 256), soft clamp ``clamp``; flow
    parameters start N(0, ``init_std``^2), prior means N(0, I). Each :meth:`fit_step` samples at
    most ``sampled_pixels`` pixels, adds N(0, ``input_noise``^2) noise and makes one Adam step
    (``lr``, ``betas``, gradient norm clipped to ``grad_clip``); the learning rate decays
    exponentially to ``lr * final_lr_ratio`` over ``total_steps`` updates. ``permutation_seed + k``
    seeds block k's permutation (the reference: 0, 1, ...).
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        total_steps: int,
        blocks: int = 2,
        hidden: int = 256,
        hidden_layers: int = 2,
        clamp: float = 2.0,
        init_std: float = 0.05,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.9),
        grad_clip: float = 50.0,
        final_lr_ratio: float = 0.01,
        sampled_pixels: int = 20480,
        input_noise: float = 0.05,
        permutation_seed: int = 0,
    ) -> None:
        super().__init__()
        require_positive(blocks=blocks, hidden=hidden, hidden_layers=hidden_layers, num_classes=num_classes)
        if feature_dim < 2:
            raise ValueError(f"a coupling flow needs feature_dim >= 2, got {feature_dim}")
        self.prior = GaussianMixturePrior(num_classes, feature_dim)
        self.couplings = nn.ModuleList(GlowCoupling(feature_dim, hidden, clamp, hidden_layers) for _ in range(blocks))
        self.permutations = nn.ModuleList(FixedPermutation(feature_dim, permutation_seed + k) for k in range(blocks))
        with torch.no_grad():
            for param in self.couplings.parameters():
                param.normal_(0.0, init_std)
        self.configure_training(total_steps, lr, betas, grad_clip, final_lr_ratio, sampled_pixels, input_noise)

    def flow_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map features ``x`` ``(N, D)`` to latents ``z`` ``(N, D)`` and ``log|det dz/dx|`` ``(N,)``."""
        log_det = x.new_zeros(x.shape[0])
        for coupling, permutation in zip(self.couplings, self.permutations):
            x, block_log_det = coupling(x)
            x = permutation(x)
            log_det = log_det + block_log_det
        return x, log_det

    def flow_inverse(self, z: Tensor) -> Tensor:
        """Map latents ``z`` back to features (the inverse of :meth:`flow_forward`)."""
        for coupling, permutation in zip(reversed(self.couplings), reversed(self.permutations)):
            z = coupling.inverse(permutation.inverse(z))
        return z

    def component_scores(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(log N(z; mu_k, I) (N, K), log|det dz/dx| (N,))`` with ``z`` the flow's image of ``features``."""
        z, log_det = self.flow_forward(features)
        return self.prior.component_log_probs(z), log_det
