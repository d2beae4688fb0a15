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
from sandbox.train.determinism import deterministic_error, nondeterministic_operation


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device``'s type here and now, or None outside autocast."""
    kind = device.type
    try:
        enabled = torch.is_autocast_enabled(kind)
    except TypeError:  # torch < 2.4 has no device argument
        enabled = torch.is_autocast_cpu_enabled() if kind == "cpu" else torch.is_autocast_enabled()
    if not enabled:
        return None
    getter = getattr(torch, "get_autocast_dtype", None)
    if getter is not None:
        return getter(kind)
    return torch.get_autocast_cpu_dtype() if kind == "cpu" else torch.get_autocast_gpu_dtype()


@contextmanager
def blame(label: str, action: str) -> Iterator[None]:
    """Run a plugin's ``action``; any exception but a ``SandboxError`` becomes a ``PluginError`` naming ``label``."""
    try:
        yield
    except SandboxError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a plugin raises is the plugin's failure
        op = nondeterministic_operation(error)
        if op is not None:  # torch's own refusal under train.deterministic, not the plugin's failure
            raise deterministic_error(f"{op} (in {label}'s {action})") from error
        raise PluginError(f"{label} raised in {action}: {describe_exception(error)}") from error


def _tensor_text(tensor: Tensor) -> str:
    return f"{tuple(tensor.shape)} {_dtype_text(tensor.dtype)} on {tensor.device}"


def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_perturbed(label: str, features: Tensor, perturbed: Any) -> Tensor | None:
    """``perturbed`` if it may replace ``features`` (or None: no perturbed view), else ``PluginError``.

    It must be a tensor of the features' shape on their device and of their dtype; under autocast
    (mixed precision) also float32 or autocast's dtype, whichever a plugin's last operation gave (then
    cast to the features' dtype). Anything else is refused alike, float64 as float16 in a float32
    run: a silent cast would change what the plugin computed (float16 rounds the step to 11 bits and
    turns values above 65504 into infinities; float64 would be cut to float32 unseen).
    """
    if perturbed is None:
        return None
    autocast = autocast_dtype(features.device)
    accepted = list(dict.fromkeys([features.dtype, *([torch.float32, autocast] if autocast is not None else [])]))
    others = " or ".join(_dtype_text(dtype) for dtype in accepted[1:])
    under = f" (or {others} under this run's autocast)" if others else ""
    expected = f"expected a tensor {_tensor_text(features)}{under} like the features (or None)"
    if not isinstance(perturbed, Tensor):
        raise PluginError(f"{label} returned {type(perturbed).__name__}, {expected}")
    if perturbed.shape != features.shape or perturbed.dtype not in accepted or perturbed.device != features.device:
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
