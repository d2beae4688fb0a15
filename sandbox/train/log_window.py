"""The values logged by the training steps since the last log line: summed on the device, read once per line."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor


class LogWindow:
    """Per key, the sum and count of the values of the updated steps since the last log line.

    :meth:`add` never reads the device (a step stays free of host synchronisations); :meth:`means`
    does, once per log line. A non-finite value (a density estimator's skipped update) is left out
    of its key's mean; a key whose every value was left out is not logged.
    """

    def __init__(
        self, sums: Mapping[str, float] | None = None, counts: Mapping[str, int] | None = None, steps: int = 0
    ) -> None:
        self.sums: dict[str, Tensor] = {key: torch.tensor(value) for key, value in (sums or {}).items()}
        self.counts: dict[str, Tensor | int] = dict(counts or {})
        self.steps = steps
        """Steps since the last log line, updated or not."""

    def add(self, logs: Mapping[str, Tensor | float]) -> None:
        """The logged values of one updated step."""
        for key, value in logs.items():
            value = torch.as_tensor(value).detach().float()
            finite = torch.isfinite(value)
            self.sums[key] = self.sums.get(key, 0.0) + torch.where(finite, value, 0.0)
            self.counts[key] = self.counts.get(key, 0) + finite.int()

    def host_counts(self) -> dict[str, int]:
        """The counts, read from the device."""
        return {key: int(count) for key, count in self.counts.items()}

    def means(self) -> dict[str, Tensor]:
        """Each key's mean over the values it counted (keys without one left out)."""
        counts = self.host_counts()
        return {key: value / counts[key] for key, value in self.sums.items() if counts[key] > 0}

    def saved(self) -> tuple[dict[str, float], dict[str, int], int]:
        """``(sums, counts, steps)`` as host numbers, for a checkpoint (see the constructor)."""
        return {key: float(value) for key, value in self.sums.items()}, self.host_counts(), self.steps
