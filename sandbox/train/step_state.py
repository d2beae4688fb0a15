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


class StepState:
    """The tensors a step may change before its non-finite check, and their copies from before the step.

    Of the ``student`` and the ``teacher``, their buffers (parameters change only after the check); of
    the ``density`` estimator (None when the method has none) everything: parameters, buffers, the
    state of its ``optimizer`` and the host numbers of its ``scheduler`` where it has them
    (:class:`~sandbox.density.online.OnlineMixtureDensity` does).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, density: nn.Module | None) -> None:
        self.student, self.teacher, self.density = student, teacher, density
        self.optimizer: torch.optim.Optimizer | None = getattr(density, "optimizer", None)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = getattr(density, "scheduler", None)
        self._saved: list[Tensor] = []
        self._with_state: list[int] = []
        self._host: dict[str, Any] = {}

    def _optimized(self) -> list[nn.Parameter]:
        """The parameters of the estimator's optimizer, in order."""
        return [p for group in self.optimizer.param_groups for p in group["params"]] if self.optimizer else []

    def _state_indices(self) -> list[int]:
        """Which of :meth:`_optimized` have optimizer state (it appears at the estimator's first update)."""
        return [index for index, parameter in enumerate(self._optimized()) if self.optimizer.state.get(parameter)]

    def _tensors(self) -> list[Tensor]:
        """The live tensors, in a fixed order."""
        tensors = [*self.student.buffers(), *self.teacher.buffers()]
        if self.density is not None:
            tensors += [p.detach() for p in self.density.parameters()] + list(self.density.buffers())
        for parameter in self._optimized():  # moments and step counters
            tensors += [value for value in self.optimizer.state.get(parameter, {}).values() if isinstance(value, Tensor)]
        return tensors

    def remember(self) -> None:
        """Copy the tensors (and the estimator's learning rates and schedule) as they are before the step."""
        tensors = self._tensors()
        indices = self._state_indices()
        if indices != self._with_state or len(self._saved) != len(tensors):  # the estimator's first update
            self._saved = [tensor.detach().clone() for tensor in tensors]
            self._with_state = indices
        elif tensors:
            torch._foreach_copy_(self._saved, [tensor.detach() for tensor in tensors])
        self._host = {
            "lr": [group["lr"] for group in self.optimizer.param_groups] if self.optimizer else None,
            "scheduler": copy.deepcopy(self.scheduler.state_dict()) if self.scheduler else None,
        }

    def restore(self) -> None:
        """Put back what :meth:`remember` copied (after a non-finite loss: the step leaves no trace)."""
        if self.optimizer is not None and self._state_indices() != self._with_state:  # state the step created
            for index, parameter in enumerate(self._optimized()):
                if index not in self._with_state:
                    self.optimizer.state.pop(parameter, None)
        tensors = self._tensors()
        if tensors:
            torch._foreach_copy_(tensors, self._saved)
        if self._host.get("lr") is not None:
            for group, lr in zip(self.optimizer.param_groups, self._host["lr"]):
                group["lr"] = lr
        if self._host.get("scheduler") is not None:
            self.scheduler.load_state_dict(self._host["scheduler"])
