"""The student's optimizer and learning-rate schedule, as a recipe's ``[train]`` describes them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sandbox.recipe import TrainSection


def implementation_options(settings: TrainSection) -> dict[str, Any]:
    """The keyword that selects ``train.optimizer_impl`` in torch's optimizers (none for ``default``,
    which leaves the choice to torch: a loop over parameters on a CPU, multi-tensor kernels on CUDA)."""
    if settings.optimizer_impl == "default":
        return {}
    return {settings.optimizer_impl: True}


def build_optimizer(
    model: nn.Module, settings: TrainSection, lr: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD or AdamW (``train.optimizer``, implemented as ``train.optimizer_impl`` says) over the
    encoder (``lr``) and the decoder (``lr`` x ``head_lr_multiplier``), poly schedule over ``iters``."""
    groups = [
        {"params": model.encoder_parameters(), "lr": lr},
        {"params": model.decoder_parameters(), "lr": lr * settings.head_lr_multiplier},
    ]
    impl = implementation_options(settings)
    if settings.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=lr, betas=settings.betas, weight_decay=settings.weight_decay, **impl
        )
    else:
        optimizer = torch.optim.SGD(
            groups, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay, **impl
        )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(1.0 - step / settings.iters, 0.0) ** settings.poly_power
    )
    return optimizer, schedule
