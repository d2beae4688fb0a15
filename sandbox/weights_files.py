"""Local weights files for plugins: read one safely, load one into an encoder.

Public API for backbone and network plugins (the built-in ``timm`` backbone and ``smp`` networks
use it): nothing is downloaded; a file is read as tensors only (``weights_only``, or safetensors),
and every problem is one ``ValueError`` / ``FileNotFoundError`` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def read_weights_file(path: Path, what: str) -> dict[str, Any]:
    """The state dict in the local weights file ``path`` (``torch.save`` or safetensors), read safely
    (tensors only); a ``ValueError`` / ``FileNotFoundError`` naming the file (as ``what``) otherwise."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a weights file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    expected = "a state dict saved by torch.save, or a .safetensors file"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable content: one line naming the file
        raise ValueError(f"{what} {path} cannot be read as weights ({type(error).__name__}); expected {expected}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path} holds a {type(state).__name__}, not a state dict; expected {expected}")
    return state


def load_encoder_weights(encoder: torch.nn.Module, path: Path) -> None:
    """Load a local checkpoint (a state dict, optionally under ``state_dict``/``model``) into ``encoder``.

    Classifier weights (``fc.*``, ``head.*``) are dropped; any other missing or unexpected key
    is an error naming the file.
    """
    state = read_weights_file(path, "backbone weights")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    # nn.Module's own loader: some encoders (smp's ResNets) override load_state_dict without returning its keys
    missing, unexpected = torch.nn.Module.load_state_dict(encoder, state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"backbone weights {path} do not match the encoder: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
