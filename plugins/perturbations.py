"""Perturbation plugins: density-descending (DDFP), feature dropout (UniMatch), complementary channel
dropout (UniMatch V2), VAT, noise, none."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.api import Perturbation, PerturbationContext, Register, hookimpl, to_device


def require_non_negative(**values: float) -> None:
    """Raise ``ValueError`` naming the first of ``values`` that is negative (a step size, a noise scale)."""
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (the size of the perturbation), got {value}")


class DensityDescending(Perturbation):
    """Move features along the gradient of the flow NLL, towards lower density (DDFP)."""

    uses_density = True

    def __init__(self, eps: float = 4.0, norm: Literal["l2", "linf"] = "l2") -> None:
        super().__init__()
        require_non_negative(eps=eps)
        self.eps, self.norm = eps, norm

    def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
        """``features + eps * g / ||g||`` per pixel, g = d NLL(classifier(features + noise)) / d noise.

        With ``norm = "linf"`` the step is ``eps * sign(g)`` (an L-infinity ball, as the reference's option).
        """
        if context.density is None:
            raise RuntimeError("the ddfp perturbation needs a density estimator in its context")
        gradient = self.gradient(features.detach(), context)
        if self.norm == "linf":
            direction = gradient.sign()
        else:
            direction = F.normalize(gradient, dim=1, eps=1e-12)
        return features + (self.eps * direction).to(features.dtype)

    def gradient(self, features: Tensor, context: PerturbationContext) -> Tensor:
        """Gradient (float32) of the NLL of the trusted pixels w.r.t. an additive noise at 0.

        The objective is the NLL summed over pixels, not the reference's mean: the step is
        normalised per pixel, so only the direction matters, and with the sum each pixel's
        gradient is that of its own NLL whatever the pixel count. With the mean it shrinks as
        1 / pixels and, through an fp16 classifier, falls into fp16's subnormal range (about 1e-6
        per element at 4 x 129 x 129 pixels), where the direction loses precision. On several
        processes with ``sync_bn`` the classifier's BatchNorm couples every process's pixels; the
        sum over each process's pixels then gives exactly one process's gradient on the whole batch.
        """
        noise = torch.zeros_like(features, requires_grad=True)
        with torch.enable_grad():
            embedding = context.classify(features + noise).embedding
            pixels = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).float()
            trusted = context.valid.reshape(-1, 1)
            # every pixel is scored, the untrusted ones as zeros and weighted 0 (no data-dependent
            # selection: the host never waits for the device; without a trusted pixel the gradient
            # is zero, after the backward pass a classifier with sync_bn needs on every process)
            log_prob = context.density.log_prob(torch.where(trusted, pixels, 0.0))
            nll = -(log_prob * trusted[:, 0]).sum()
            (grad,) = torch.autograd.grad(nll, noise)
        return grad.float()


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


class ComplementaryChannelDropout(Perturbation):
    """UniMatch V2's complementary channel dropout (``model/semseg/dpt.py``, ``comp_drop=True``).

    Every image gets one channel mask for all the maps of its pass: each channel kept (x2) or
    dropped with probability 0.5, a Binomial(1, 0.5) x 2. The two views of one image
    (:attr:`~sandbox.api.PerturbationContext.views` = 2: the strong views perturbed in place,
    ``train.perturbed_view = "strong_in_place"``) get complementary masks, 2 minus the first: what
    one view drops, the other keeps. A random ``kept`` fraction of the images (pairs) is left
    unmasked (``int(pairs * kept)`` of them, V2's ``num_kept``). With one view each image's mask
    is drawn alone. Maps of different widths (a CNN's stages) get a mask each, the unmasked images
    the same for all. The masks are drawn in host memory from torch's global generator, as V2
    (Binomial, then the unmasked images by ``randperm``), and copied to the device without waiting.
    """

    def __init__(self, kept: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= kept <= 1.0:
            raise ValueError(f"kept must be in [0, 1] (the fraction of images left unmasked), got {kept}")
        self.kept = kept
        self.binomial = torch.distributions.Binomial(probs=torch.tensor(0.5))

    def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
        """``features`` times their images' masks (one map: the classifier's input)."""
        return self.perturb_maps([features], context)[0]

    def perturb_maps(self, maps: list[Tensor], context: PerturbationContext) -> list[Tensor] | None:
        """Every map times its images' channel masks (one draw per distinct channel count)."""
        count, views = maps[0].shape[0], context.views
        if views not in (1, 2) or count % views:
            raise ValueError(f"complementary dropout pairs 1 or 2 views of equal size; got {count} images in {views} views")
        images = count // views
        masks: dict[int, Tensor] = {}
        unmasked: Tensor | None = None
        for feature_map in maps:
            width = feature_map.shape[1]
            if width in masks:
                continue
            first = self.binomial.sample((images, width)) * 2.0
            if unmasked is None:
                unmasked = torch.randperm(images)[: int(images * self.kept)]
            first[unmasked] = 1.0
            mask = torch.cat([first, 2.0 - first]) if views == 2 else first
            masks[width] = to_device(mask, feature_map.device)
        return [m * masks[m.shape[1]].to(m.dtype)[:, :, None, None] for m in maps]


class VirtualAdversarial(Perturbation):
    """Virtual adversarial feature perturbation: power iteration on the prediction KL (VAT)."""

    def __init__(self, eps: float = 4.0, xi: float = 0.1, iterations: int = 1) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"vat iterations must be >= 1, got {iterations}")
        require_non_negative(eps=eps)
        if xi <= 0:
            raise ValueError(f"xi must be > 0 (the power iteration's finite-difference step), got {xi}")
        self.eps, self.xi, self.iterations = eps, xi, iterations

    def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
        """``features + eps * d`` with d the per-pixel unit direction that most raises the KL.

        ``xi`` is the finite-difference step of the power iteration. VAT's 1e-6 (for images in
        [0, 1]) is lost to float32 rounding on features whose per-pixel norm is in the tens.
        """
        return features + (self.eps * self.direction(features.detach(), context)).to(features.dtype)

    def direction(self, features: Tensor, context: PerturbationContext) -> Tensor:
        """Power iteration from a random direction; KL(clean || perturbed) summed over trusted pixels.

        The sum, not the mean: each step is normalised per pixel, so only the direction matters, and
        with ``sync_bn`` the sum over each process's pixels is one process's objective on the whole batch.
        """
        with torch.no_grad():
            clean = context.classify(features).logits.float().log_softmax(dim=1)
        direction = F.normalize(torch.randn_like(features, dtype=torch.float32), dim=1)
        valid = context.valid.unsqueeze(1).float()
        for _ in range(self.iterations):
            direction.requires_grad_(True)
            with torch.enable_grad():
                logits = context.classify(features + (self.xi * direction).to(features.dtype)).logits.float()
                kl = F.kl_div(logits.log_softmax(dim=1), clean, log_target=True, reduction="none")
                loss = (kl * valid).sum()
                (grad,) = torch.autograd.grad(loss, direction)
            direction = F.normalize(grad, dim=1, eps=1e-12).detach()
        return direction


class FeatureNoise(Perturbation):
    """Random noise added to the features: gaussian or uniform, scaled (by default to norm ``scale`` per pixel)."""

    def __init__(
        self, distribution: Literal["gaussian", "uniform"] = "gaussian", scale: float = 4.0, fixed_norm: bool = True
    ) -> None:
        super().__init__()
        require_non_negative(scale=scale)
        self.distribution, self.scale, self.fixed_norm = distribution, scale, fixed_norm

    def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
        """``features + scale * noise``; with ``fixed_norm`` the noise has norm ``scale`` at every pixel."""
        if self.distribution == "gaussian":
            noise = torch.randn_like(features)
        else:
            noise = torch.rand_like(features) * 2.0 - 1.0
        if self.fixed_norm:
            noise = F.normalize(noise.float(), dim=1).to(features.dtype)
        return features + self.scale * noise


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
    register("complementary_dropout", ComplementaryChannelDropout)
    register("vat", VirtualAdversarial)
    register("noise", FeatureNoise)
    register("none", NoPerturbation)
