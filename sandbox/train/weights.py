"""Saved model weights: a run's ``best.pt``/``last.pt`` or a plain state-dict file."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from sandbox.errors import SandboxError


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model weights from ``best.pt``/``last.pt`` of a run, or a plain state-dict file."""
    expected = "expected a run's best.pt or last.pt"
    if path.is_dir():
        best = path / "best.pt"
        hint = f"; did you mean {best}?" if best.is_file() else ""
        raise SandboxError(f"checkpoint {path} is a directory ({expected}){hint}")
    if not path.is_file():
        raise SandboxError(f"checkpoint {path} does not exist ({expected})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or pickled objects other than plain data
        raise SandboxError(f"checkpoint {path} could not be read: {unreadable_reason(path, error)} ({expected})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise SandboxError(f"checkpoint {path} holds no state dict")
    return state


def unreadable_reason(path: Path, error: Exception) -> str:
    """Why ``torch.load`` refused ``path``, in a line that makes sense to a user."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):  # neither a zip archive nor a legacy pickle
        return "not a PyTorch file"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # the archive's directory, at its end, is missing
        return "the file is truncated or damaged (an incomplete PyTorch archive); copy or save it again"
    if "weights_only" in str(error) or "Unsupported global" in str(error):
        return "it holds Python objects other than tensors and plain data, which are not loaded (weights_only)"
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {detail}"


def apply_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path, recipe_name: str) -> None:
    """Load ``weights`` (read from ``path``) into ``model``; another architecture's are a one-line error."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    reshaped = [key for key, value in expected.items() if key in weights and tuple(weights[key].shape) != tuple(value.shape)]
    if missing or unexpected or reshaped:
        parts = sorted({key.split(".")[0] for key in (*missing, *unexpected, *reshaped)})
        details = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else ""]
        details += [f"shape of {key}: {tuple(weights[key].shape)} in the file, {tuple(expected[key].shape)} here" for key in reshaped[:2]]
        raise SandboxError(
            f"checkpoint {path} does not fit recipe {recipe_name!r} (mismatched parts: {', '.join(parts)}): "
            + "; ".join(detail for detail in details if detail)
        )
    model.load_state_dict(weights)
