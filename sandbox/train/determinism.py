"""``train.deterministic`` and what a run records of the arithmetic it ran on (``summary.json``'s ``compute``).

With ``train.deterministic = true`` torch runs deterministic algorithms only
(``torch.use_deterministic_algorithms``, cuDNN's deterministic kernels without autotuning, cuBLAS
with a fixed workspace) and an operation without a deterministic implementation on the device stops
the run with one line naming it (:func:`nondeterministic_operation`). The data pipeline needs nothing
more: every sample is augmented under its own seed (``sandbox.data.views``), whatever the number of
loader workers, and every process seeds its generators from the recipe.

What stays apart even so: the thread count and the CPU's vector kernels (AVX2, AVX-512) change the
order of floating-point sums, and GPUs of other generations run other kernels. :func:`compute_record`
writes them into ``summary.json`` so that ``sandbox compare`` can say when runs it pairs differ in them.
"""

from __future__ import annotations

import os
import platform
import re
from typing import Any

import torch

from sandbox.errors import SandboxError

CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS's workspace setting for deterministic results (CUDA's documentation of cuBLAS reproducibility)."""

_ALERT = re.compile(r"^(?P<op>.+?) does not have a deterministic implementation")


def apply_determinism(enabled: bool) -> None:
    """Set torch's deterministic switches for a run (and clear them for a run without, in the same process)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.mkldnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False


def nondeterministic_operation(error: BaseException) -> str | None:
    """The operation named by torch's "does not have a deterministic implementation" error, else None."""
    if not isinstance(error, RuntimeError):
        return None
    match = _ALERT.match(str(error).strip())
    return match.group("op") if match else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compute_record(device: torch.device, deterministic: bool) -> dict[str, Any]:
    """What the run's arithmetic depended on besides its code and seed: threads, CPU kernels, device."""
    record: dict[str, Any] = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "deterministic": deterministic,
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
        record["cudnn"] = torch.backends.cudnn.version()
        record["tf32"] = torch.backends.cuda.matmul.allow_tf32
    return record


COMPARED = ("device", "threads", "cpu_capability", "gpu", "deterministic")
"""The :func:`compute_record` entries ``sandbox compare`` warns about when the runs it counts differ in them."""


def deterministic_error(op: str) -> SandboxError:
    """The one-line error for an operation ``op`` without a deterministic implementation."""
    return SandboxError(
        f"train.deterministic = true: {op} has no deterministic implementation on this device; set "
        "train.deterministic = false to run it (results then vary from run to run by that operation's order of sums)"
    )
