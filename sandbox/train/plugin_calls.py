"""Calls into the method's plugins during a step: a failure or a malformed result names the plugin.

A perturbation returning the wrong shape would otherwise fail deep inside the classifier (or,
with a different spatial size, be broadcast silently), a wrong dtype inside a convolution, a
list in ``torch.cat``; each gives a traceback that never says which plugin was at fault. The
checks are cheap (no device synchronisation): types, shapes, dtypes and devices only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from sandbox.errors import PluginError, SandboxError, describe_exception


MIXED_PRECISION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The floating dtypes a perturbation may return besides the features' own."""


@contextmanager
def blame(label: str, action: str) -> Iterator[None]:
    """Run a plugin's ``action``; any exception but a ``SandboxError`` becomes a ``PluginError`` naming ``label``."""
    try:
        yield
    except SandboxError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a plugin raises is the plugin's failure
        raise PluginError(f"{label} raised in {action}: {describe_exception(error)}") from error


def _tensor_text(tensor: Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} on {tensor.device}"


def check_perturbed(label: str, features: Tensor, perturbed: Any) -> Tensor | None:
    """``perturbed`` if it may replace ``features`` (or None: no perturbed view), else ``PluginError``.

    It must be a floating-point tensor of the features' shape on their device, of their dtype or
    a floating dtype of mixed precision (float32, float16, bfloat16: under autocast a plugin's
    last operation decides it), then cast to the features' dtype. float64 and integers are refused.
    """
    if perturbed is None:
        return None
    expected = f"expected a tensor {_tensor_text(features)} like the features (or None)"
    if not isinstance(perturbed, Tensor):
        raise PluginError(f"{label} returned {type(perturbed).__name__}, {expected}")
    wrong_dtype = perturbed.dtype not in (features.dtype, *MIXED_PRECISION_DTYPES)
    if perturbed.shape != features.shape or wrong_dtype or perturbed.device != features.device:
        raise PluginError(f"{label} returned a tensor {_tensor_text(perturbed)}, {expected}")
    return perturbed.to(features.dtype)


def check_loss(label: str, loss: Any) -> Tensor:
    """``loss`` if it is a floating-point scalar tensor, else ``PluginError``."""
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        found = _tensor_text(loss) if isinstance(loss, Tensor) else type(loss).__name__
        raise PluginError(f"{label} returned {found}, expected a floating-point scalar tensor")
    return loss.reshape(())


def check_density_stats(label: str, stats: Any) -> dict[str, float | Tensor]:
    """``fit_step``'s result if it is a dict of names to numbers (Python numbers or one-element
    tensors, kept on their device: reading them would wait for it), else ``PluginError``."""

    def number(value: Any) -> bool:
        if isinstance(value, Tensor):
            return value.numel() == 1 and not value.dtype.is_complex
        return isinstance(value, (int, float))

    if not isinstance(stats, dict) or not all(isinstance(k, str) and number(v) for k, v in stats.items()):
        raise PluginError(f"{label} fit_step returned {stats!r:.80}, expected a dict of names to numbers (e.g. {{'nll': 1.2}})")
    return {key: value.detach().float().reshape(()) if isinstance(value, Tensor) else float(value)
            for key, value in stats.items()}
