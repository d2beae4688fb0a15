"""Speed levers (``train.channels_last``, ``train.compile``, ``train.optimizer_impl``), applied one way.

:func:`build_networks` is the one place where a run's student, teacher and optimizer get the
recipe's levers: the training loop calls it, and so does ``sandbox bench`` (which therefore times
what a run executes). Every lever off (the defaults) leaves the networks untouched (no wrapped
method, no format change, no compilation) and the optimizer torch's default.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate import Accelerator

from sandbox.api import SegmentationNetwork
from sandbox.errors import SandboxError
from sandbox.recipe import TrainSection
from sandbox.processes.batchnorm import maybe_sync_batchnorm
from sandbox.train.optimizer import build_optimizer
from sandbox.train.student_pass import StudentPass


@dataclass
class Networks:
    """A run's student, EMA teacher, optimizer and schedule, levers applied, before ``accelerator.prepare``."""

    student: SegmentationNetwork
    teacher: SegmentationNetwork
    """On the accelerator's device, without gradients (never prepared)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    buffers_agree: bool = False
    """Every process computes the same buffers (``train.sync_bn``): DDP need not broadcast them."""

    def prepare(self, accelerator: Accelerator) -> tuple[torch.nn.Module, Any, Any]:
        """``accelerator.prepare`` of the student's training pass (:class:`StudentPass`: what DDP wraps),
        the optimizer and the schedule.

        DDP makes every process's buffers the main process's when it wraps the model; with
        :attr:`buffers_agree` it does not broadcast them again before each forward pass (a
        collective per pass that would change nothing: ``sync_bn`` takes BatchNorm's running
        statistics to be the only buffers a forward pass changes).
        """
        model, optimizer, scheduler = accelerator.prepare(StudentPass(self.student), self.optimizer, self.scheduler)
        if self.buffers_agree and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.broadcast_buffers = False  # torch >= 2.14 calls it forward_sync_buffers; this setter stays
        return model, optimizer, scheduler


def image_methods(network: SegmentationNetwork) -> list[str]:
    """The network's methods that receive images: ``encode`` and, where it has it, ``extract``."""
    return ["encode", "extract"] if network.has_encoder_maps() else ["encode"]


def channels_last_images(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` receiving its images ``(B, 3, H, W)`` in channels_last memory format."""

    @functools.wraps(method)
    def converted(images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return method(images.contiguous(memory_format=torch.channels_last), *args, **kwargs)

    return converted


def use_channels_last(network: SegmentationNetwork) -> None:
    """``network``'s 4-D weights, and the images its :func:`image_methods` receive, in channels_last format.

    The images are converted where every pass enters the network (its own ``forward``, the
    student's training pass, evaluation), so the whole network computes in NHWC.
    """
    network.to(memory_format=torch.channels_last)  # 4-D weights; other tensors keep their layout
    for name in image_methods(network):
        setattr(network, name, channels_last_images(getattr(network, name)))


def check_compiler(device: torch.device) -> None:
    """A one-line error when ``train.compile`` cannot work here (a CPU without a C++ compiler)."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - whatever inductor's search raises, the fix is the same
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SandboxError(
            f"train.compile = true: torch.compile on a CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX), "
            f"none found ({first}); install one or set train.compile = false"
        ) from None


COMPILED_MODULES = ("classifier", "final")
"""The network's modules whose ``forward`` is compiled (the classifier is also run with Mix BN's
auxiliary statistics: its Python switch between the two stays outside the compiled code)."""


def compile_network(network: SegmentationNetwork) -> None:
    """``torch.compile`` a network's compute: :meth:`~sandbox.api.SegmentationNetwork.encode` (and
    ``extract``/``decode`` where it has them) and the ``forward`` of its ``classifier`` and ``final``.

    Each becomes a compiled function on its own instance: parameters, ``state_dict`` keys and
    the glue between the parts (the student's pass with the perturbation's callback and the
    density estimator it calls) are unchanged and stay eager. Compiling whole modules with
    :meth:`nn.Module.compile` would put every one of them on one compiled code object and exhaust
    dynamo's recompilation limit. A copy of the network made afterwards would call the original's
    compiled functions: copy first, then compile.
    """
    for name in image_methods(network) + (["decode"] if network.has_encoder_maps() else []):
        setattr(network, name, torch.compile(getattr(network, name)))
    for name in COMPILED_MODULES:
        module = getattr(network, name)
        module.forward = torch.compile(module.forward)


def apply_network_levers(network: SegmentationNetwork, settings: TrainSection, device: torch.device) -> SegmentationNetwork:
    """``network`` with ``train.channels_last`` and ``train.compile`` applied (unchanged when both are off)."""
    if settings.compile:  # compiled first: the images are converted before they enter the compiled code
        check_compiler(device)
        compile_network(network)
    if settings.channels_last:
        use_channels_last(network)
    return network


def build_networks(model: SegmentationNetwork, accelerator: Accelerator, settings: TrainSection, lr: float) -> Networks:
    """The teacher (a copy of ``model``), the student (``model`` itself) and its optimizer, levers applied.

    With ``train.sync_bn`` both normalise over every process's batch (the teacher's train-mode
    passes too). Each network gets the levers separately, after the copy (a compiled module is
    not copied). The student moves to its device in :meth:`Networks.prepare`, which the caller runs.
    """
    device = accelerator.device
    teacher = maybe_sync_batchnorm(copy.deepcopy(model), accelerator, settings.sync_bn, settings.sync_bn_impl)
    teacher = apply_network_levers(teacher.requires_grad_(False).to(device), settings, device)
    student = apply_network_levers(
        maybe_sync_batchnorm(model, accelerator, settings.sync_bn, settings.sync_bn_impl), settings, device
    )
    optimizer, scheduler = build_optimizer(student, settings, lr)
    buffers_agree = settings.sync_bn and accelerator.num_processes > 1
    return Networks(student, teacher, optimizer, scheduler, buffers_agree)
