"""Saved model weights: a run's ``best.pt``/``last.pt`` or a plain state-dict file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sandbox.errors import SandboxError


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model weights from ``best.pt``/``last.pt`` of a run, or a plain state-dict file."""
    if not path.is_file():
        raise SandboxError(f"checkpoint {path} does not exist (expected a run's best.pt or last.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SandboxError(f"checkpoint {path} could not be read: {type(error).__name__}: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise SandboxError(f"checkpoint {path} holds no state dict")
    return state


def apply_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path, recipe_name: str) -> None:
    """Load ``weights`` (read from ``path``) into ``model``; another architecture's are a one-line error."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SandboxError(
            f"checkpoint {path} does not fit recipe {recipe_name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
