"""What a training step changes before its non-finite check, remembered so that a skipped step leaves no trace.

The forward pass of a step already changes state before the loss is known to be finite: the
student's and the teacher's BatchNorm statistics (train-mode passes) and the density estimator,
whose update runs inside the pass (DDFP perturbs with the updated estimator). :class:`StepState`
copies those tensors before the step, into buffers allocated once (one foreach copy per step, no
host synchronisation), and puts them back when the step is skipped. The optimizer's own state does
not change before the check (the student's optimizer steps only after it).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[Tensor]:
    """Every tensor of ``optimizer``'s per-parameter state (moments, step counters), in a fixed order."""
    if optimizer is None:
        return []
    return [value for group in optimizer.param_groups for p in group["params"]
            for value in optimizer.state.get(p, {}).values() if isinstance(value, Tensor)]


class StepState:
    """The tensors a step may change before its non-finite check, and their copies from before the step.

    ``modules``: the student, the teacher and the density estimator (None when the method has none).
    Of the student and the teacher, their buffers (parameters change only after the check); of the
    estimator everything: parameters, buffers, the state of its ``optimizer`` and the host numbers of
    its ``scheduler`` where it has them (:class:`~sandbox.density.online.OnlineMixtureDensity` does).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, density: nn.Module | None) -> None:
        self.student, self.teacher, self.density = student, teacher, density
        self._saved: list[Tensor] = []
        self._optimizer_keys: list[int] = []
        self._host: dict[str, Any] = {}

    def _tensors(self) -> list[Tensor]:
        """The live tensors, in a fixed order."""
        tensors = [*self.student.buffers(), *self.teacher.buffers()]
        if self.density is not None:
            tensors += [p.detach() for p in self.density.parameters()] + list(self.density.buffers())
            tensors += _optimizer_tensors(getattr(self.density, "optimizer", None))
        return tensors

    def _state_keys(self) -> list[int]:
        """Which parameters (by index) of the estimator's optimizer have state (it appears at the first update)."""
        optimizer = getattr(self.density, "optimizer", None) if self.density is not None else None
        if optimizer is None:
            return []
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        return [index for index, parameter in enumerate(parameters) if optimizer.state.get(parameter)]

    def remember(self) -> None:
        """Copy the tensors (and the estimator's schedule) as they are before the step."""
        tensors = self._tensors()
        keys = self._state_keys()
        if keys != self._optimizer_keys or len(self._saved) != len(tensors):  # the estimator's first update
            self._saved = [tensor.detach().clone() for tensor in tensors]
            self._optimizer_keys = keys
        elif tensors:
            torch._foreach_copy_(self._saved, [tensor.detach() for tensor in tensors])
        self._host = self._host_numbers()

    def _host_numbers(self) -> dict[str, Any]:
        """The estimator's learning rates and its schedule's state (host numbers)."""
        if self.density is None:
            return {}
        optimizer, scheduler = getattr(self.density, "optimizer", None), getattr(self.density, "scheduler", None)
        return {
            "lr": [group["lr"] for group in optimizer.param_groups] if optimizer is not None else None,
            "scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
        }

    def restore(self) -> None:
        """Put back what :meth:`remember` copied (after a non-finite loss: the step leaves no trace)."""
        optimizer = getattr(self.density, "optimizer", None) if self.density is not None else None
        if optimizer is not None and self._state_keys() != self._optimizer_keys:  # state the step created
            remembered = set(self._optimizer_keys)
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            for index, parameter in enumerate(parameters):
                if index not in remembered:
                    optimizer.state.pop(parameter, None)
        tensors = self._tensors()
        if tensors:
            torch._foreach_copy_(tensors, self._saved)
        if optimizer is not None and self._host.get("lr") is not None:
            for group, lr in zip(optimizer.param_groups, self._host["lr"]):
                group["lr"] = lr
        scheduler = getattr(self.density, "scheduler", None) if self.density is not None else None
        if scheduler is not None and self._host.get("scheduler") is not None:
            scheduler.load_state_dict(self._host["scheduler"])
