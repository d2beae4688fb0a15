"""Consistency-loss plugins on the teacher's soft probabilities: KL divergence and squared error.

Both compute in float32, score each pixel, and average over the trusted pixels with
:func:`masked_mean`. An untrusted pixel's score is zeroed before averaging: it adds nothing to
the value (not even a NaN) and, when finite, receives no gradient; an all-untrusted batch gives 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sandbox.api import ConsistencyLoss, Register, hookimpl, masked_mean


def trusted_mean(per_pixel: Tensor, valid: Tensor) -> Tensor:
    """:func:`masked_mean` of ``per_pixel`` ``(B, H, W)`` with untrusted pixels zeroed first."""
    return masked_mean(torch.where(valid, per_pixel, per_pixel.new_zeros(())), valid)


class SoftKLDivergence(ConsistencyLoss):
    """KL(teacher || student) per pixel on the teacher's soft probabilities, over trusted pixels.

    Per pixel ``sum_k p_k (log p_k - log q_k)`` with ``p`` the teacher's probabilities and
    ``q = softmax(logits / temperature)`` (no ``temperature^2`` rescaling); ``0 log 0 = 0``.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0.0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, logits: Tensor, target_probs: Tensor, valid: Tensor) -> Tensor:
        """Mean per-pixel KL over the trusted pixels."""
        log_student = F.log_softmax(logits.float() / self.temperature, dim=1)
        target = target_probs.float()
        per_pixel = (torch.xlogy(target, target) - target * log_student).sum(dim=1)
        return trusted_mean(per_pixel, valid)


class SoftMeanSquaredError(ConsistencyLoss):
    """Squared error between student and teacher probabilities (mean over classes), trusted pixels."""

    def forward(self, logits: Tensor, target_probs: Tensor, valid: Tensor) -> Tensor:
        """Mean over trusted pixels of ``mean_k (softmax(logits)_k - p_k)^2``."""
        per_pixel = (F.softmax(logits.float(), dim=1) - target_probs.float()).pow(2).mean(dim=1)
        return trusted_mean(per_pixel, valid)


@hookimpl
def sandbox_register_consistency_losses(register: Register) -> None:
    """Register the soft-target consistency losses ``kl`` and ``mse``."""
    register("kl", SoftKLDivergence)
    register("mse", SoftMeanSquaredError)
