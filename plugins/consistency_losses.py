"""Consistency-loss plugins: cross-entropy on confident pseudo-labels (the paper's)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sandbox.api import ConsistencyLoss, Register, hookimpl, masked_mean


class PseudoLabelCrossEntropy(ConsistencyLoss):
    """Cross-entropy with the teacher's argmax as target, on trusted pixels only."""

    def forward(self, logits: Tensor, target_probs: Tensor, valid: Tensor) -> Tensor:
        """Mean CE over the trusted pixels."""
        per_pixel = F.cross_entropy(logits.float(), target_probs.argmax(dim=1), reduction="none")
        return masked_mean(per_pixel, valid)


@hookimpl
def sandbox_register_consistency_losses(register: Register) -> None:
    """Register the built-in consistency losses."""
    register("ce", PseudoLabelCrossEntropy)
