"""Density estimator plugin "nflows": a flow built from nflows transforms, Gaussian-mixture prior.

The same model and training protocol as "glow" (FlowGMM-style prior, online Adam updates; see
:mod:`sandbox.density.online`), with the flow assembled from nflows' transforms into a
``CompositeTransform`` whose ``forward(x)`` returns ``(z, log|det dz/dx|)``. The prior is ours:
nflows' distributions have no labeled/unlabeled mixture.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from nflows.nn.nets import ResidualNet
from nflows.transforms import (
    AffineCouplingTransform,
    CompositeTransform,
    MaskedAffineAutoregressiveTransform,
    ReversePermutation,
    Transform,
)
from torch import Tensor, nn

from sandbox.density import GaussianMixturePrior, OnlineMixtureDensity, require_positive
from sandbox.api import Register, hookimpl

TransformKind = Literal["affine_coupling", "autoregressive"]


@hookimpl
def sandbox_register_density_estimators(register: Register) -> None:
    """Register the nflows flow with a Gaussian-mixture prior as ``nflows``."""
    register("nflows", NflowsDensity)


def alternating_mask(dim: int, block: int) -> Tensor:
    """Coupling mask of block ``block``: even features transformed in even blocks, odd in odd ones."""
    return (torch.arange(dim) + block) % 2 == 0


def build_flow(kind: TransformKind, dim: int, blocks: int, hidden: int, residual_blocks: int) -> CompositeTransform:
    """``blocks`` nflows transforms of ``kind`` on ``dim`` features, as one ``CompositeTransform``.

    ``affine_coupling``: ``AffineCouplingTransform`` with alternating masks, each conditioner a
    ``ResidualNet`` of width ``hidden`` with ``residual_blocks`` residual blocks (each coupling
    transforms half the features). ``autoregressive``: ``MaskedAffineAutoregressiveTransform``
    (MADE of width ``hidden``, ``residual_blocks`` residual blocks) with a ``ReversePermutation``
    between consecutive blocks.
    """
    def conditioner(in_features: int, out_features: int) -> nn.Module:
        """A coupling's conditioner network (nflows calls it with the two widths)."""
        return ResidualNet(in_features, out_features, hidden, num_blocks=residual_blocks)

    transforms: list[Transform] = []
    for block in range(blocks):
        if kind == "affine_coupling":
            transforms.append(AffineCouplingTransform(alternating_mask(dim, block), conditioner))
        elif kind == "autoregressive":
            if block > 0:
                transforms.append(ReversePermutation(dim))
            transforms.append(MaskedAffineAutoregressiveTransform(dim, hidden, num_blocks=residual_blocks))
        else:
            raise ValueError(f"unknown nflows transform {kind!r}; use 'affine_coupling' or 'autoregressive'")
    return CompositeTransform(transforms)


def start_near_identity(flow: CompositeTransform) -> None:
    """Zero every conditioner's output layer, so each block starts as a fixed elementwise scaling.

    A MADE block's scale biases are then set to ``softplus^-1(1 - epsilon)``: it starts as the
    identity. An nflows affine coupling's scale is ``sigmoid(u + 2) + 0.001`` (at most 1.001,
    saturating near 1), so a coupling starts as the scaling ``sigmoid(2) + 0.001 = 0.882`` of the
    half it transforms.
    """
    with torch.no_grad():
        for module in flow.modules():
            final = getattr(module, "final_layer", None)  # ResidualNet's and MADE's output layer
            if isinstance(final, nn.Linear):
                final.weight.zero_()
                final.bias.zero_()
        for module in flow.modules():  # after the zeroing, which visits MADE after its transform
            if isinstance(module, MaskedAffineAutoregressiveTransform):
                # MADE's outputs are (scale, shift) pairs per feature: scale parameters at even indices.
                identity = math.log(math.expm1(1.0 - module._epsilon))
                module.autoregressive_net.final_layer.bias[0::2] = identity


class NflowsDensity(OnlineMixtureDensity):
    """A flow of nflows transforms with a Gaussian-mixture prior, trained online like "glow".

    Options: ``transform`` (``"affine_coupling"`` or ``"autoregressive"``, see :func:`build_flow`),
    ``blocks`` transforms whose conditioners have width ``hidden`` and ``residual_blocks``
    residual blocks. An nflows coupling transforms half the features, so 4 couplings are about
    glow's 2 blocks. With ``identity_init`` every block starts at (autoregressive) or near
    (coupling: a 0.88 scaling of half the features) the identity, see
    :func:`start_near_identity`, as glow's small initial weights do; else nflows' default
    initialisation. Prior means start N(0, I). Training options as "glow": at most
    ``sampled_pixels`` pixels per step with N(0, ``input_noise``^2) noise, Adam (``lr``,
    ``betas``), gradient norm clipped to ``grad_clip``, learning rate decayed exponentially to
    ``lr * final_lr_ratio`` over ``total_steps`` updates.
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        total_steps: int,
        transform: TransformKind = "affine_coupling",
        blocks: int = 4,
        hidden: int = 256,
        residual_blocks: int = 1,
        identity_init: bool = True,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.9),
        grad_clip: float = 50.0,
        final_lr_ratio: float = 0.01,
        sampled_pixels: int = 20480,
        input_noise: float = 0.05,
    ) -> None:
        super().__init__()
        require_positive(blocks=blocks, hidden=hidden, residual_blocks=residual_blocks, num_classes=num_classes)
        if feature_dim < 2:
            raise ValueError(f"an nflows flow needs feature_dim >= 2, got {feature_dim}")
        self.prior = GaussianMixturePrior(num_classes, feature_dim)
        self.flow = build_flow(transform, feature_dim, blocks, hidden, residual_blocks)
        if identity_init:
            start_near_identity(self.flow)
        self.configure_training(total_steps, lr, betas, grad_clip, final_lr_ratio, sampled_pixels, input_noise)

    def flow_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map features ``x`` ``(N, D)`` to latents ``z`` ``(N, D)`` and ``log|det dz/dx|`` ``(N,)``."""
        return self.flow(x)

    def flow_inverse(self, z: Tensor) -> Tensor:
        """Map latents ``z`` back to features (``D`` passes per autoregressive block)."""
        x, _ = self.flow.inverse(z)
        return x

    def component_scores(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(log N(z; mu_k, I) (N, K), log|det dz/dx| (N,))`` with ``z`` the flow's image of ``features``."""
        z, log_det = self.flow(features)
        return self.prior.component_log_probs(z), log_det
