"""The values logged by the training steps since the last log line: summed on the device, read once per line."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy
import torch
from torch import Tensor

from sandbox.recipe import TrainSection


def is_log_step(step: int, settings: TrainSection) -> bool:
    """Whether iteration ``step`` (0-based) writes a log line: the ``log_every``-th finished iteration
    of each window, and the last one (``iters``). The loop writes it; the step computes what only a
    log line reads (:func:`~sandbox.train.step.relative_step`) on these iterations alone."""
    finished = step + 1
    return finished % settings.log_every == 0 or finished == settings.iters


def float32(value: float) -> float:
    """``value`` rounded to float32 (infinite beyond its range), as a host float.

    The sum of two such values, added in binary64 and rounded by this, is float32's own sum
    (binary64's 53 bits are at least twice float32's 24 plus 2: rounding twice rounds as once).
    """
    with numpy.errstate(over="ignore"):
        return float(numpy.float32(value))


class LogWindow:
    """Per key, the sum and count of the values of the updated steps since the last log line.

    :meth:`add` never reads the device (a step stays free of host synchronisations); :meth:`means`
    does, once per log line. A non-finite value (a density estimator's skipped update) is left out
    of its key's mean; a key whose every value was left out is not logged.

    Sums are in float32 and counts in int32, each key's values added in step order, whichever way
    they are kept: the tensor values of consecutive steps with the same keys in one running vector
    on the device (a few operations a step whatever the number of keys), host floats (``density_lr``)
    on the host. The running vectors are split into per-key values (:attr:`sums`, :attr:`counts`)
    when the keys change and when the window is read.
    """

    def __init__(
        self, sums: Mapping[str, float] | None = None, counts: Mapping[str, int] | None = None, steps: int = 0
    ) -> None:
        self._sums: dict[str, Tensor | float] = {key: float32(value) for key, value in (sums or {}).items()}
        self._counts: dict[str, Tensor | int] = {key: int(value) for key, value in (counts or {}).items()}
        self._order: dict[str, None] = dict.fromkeys([*self._sums, *self._counts])
        """Every key, in the order it first came."""
        self._keys: tuple[str, ...] = ()
        """The keys of the running vectors, in the order of the steps' values."""
        self._running_sums: Tensor | None = None
        self._running_counts: Tensor | None = None
        self.steps = steps
        """Steps since the last log line, updated or not."""

    @property
    def keys(self) -> list[str]:
        """Every key a step of this window logged (or its saved window held), in the order it first came."""
        return list(self._order)

    @property
    def sums(self) -> dict[str, Tensor | float]:
        """Each key's sum of finite values: a float32 tensor (on the device) or a host float."""
        self._split()
        return {key: self._sums[key] for key in self._order}

    @property
    def counts(self) -> dict[str, Tensor | int]:
        """Each key's number of finite values: an int32 tensor (on the device) or a host int."""
        self._split()
        return {key: self._counts[key] for key in self._order}

    def add(self, logs: Mapping[str, Tensor | float]) -> None:
        """The logged values of one updated step."""
        device = next(
            (value.device for value in logs.values() if isinstance(value, Tensor) and value.device.type != "cpu"),
            torch.device("cpu"),
        )
        keys, values, host = [], [], []
        for key, value in logs.items():
            self._order.setdefault(key)
            if isinstance(value, Tensor) and value.device == device:
                keys.append(key)
                values.append(value)
            else:  # a host float (or a host tensor of a device run)
                host.append((key, float(value)))
        if tuple(keys) != self._keys:
            self._split()
            self._keys, self._running_sums, self._running_counts = tuple(keys), None, None
        for key, value in host:
            self._add_on_host(key, value)
        if not keys:
            return
        with torch.no_grad():
            if self._running_sums is None or self._running_counts is None:
                self._running_sums, self._running_counts = self._start(device)
            stacked = torch.stack(values, out=torch.empty(len(values), dtype=torch.float32, device=device))  # as .float()
            finite = torch.isfinite(stacked)
            self._running_sums = self._running_sums + torch.where(finite, stacked, 0.0)
            self._running_counts = self._running_counts + finite

    def _add_on_host(self, key: str, value: float) -> None:
        """Add one host value to ``key`` in float32, as the device would (left out when not finite)."""
        value = float32(value)
        finite = math.isfinite(value)
        added = value if finite else 0.0
        stored = self._sums.get(key, 0.0)
        self._sums[key] = stored + added if isinstance(stored, Tensor) else float32(stored + added)
        self._counts[key] = self._counts.get(key, 0) + int(finite)

    def _start(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Running sums and counts for :attr:`_keys` from their per-key ones (zeros for new keys)."""
        sums = [self._sums.get(key) for key in self._keys]
        counts = [self._counts.get(key) for key in self._keys]
        if all(value is None for value in sums + counts):  # the usual case: a window's first step
            return (torch.zeros(len(sums), dtype=torch.float32, device=device),
                    torch.zeros(len(counts), dtype=torch.int32, device=device))

        def scalar(value: Tensor | float | None, dtype: torch.dtype) -> Tensor:
            if isinstance(value, Tensor):
                return value.to(device=device, dtype=dtype)
            return torch.full((), 0 if value is None else value, dtype=dtype, device=device)

        return (torch.stack([scalar(value, torch.float32) for value in sums]),
                torch.stack([scalar(value, torch.int32) for value in counts]))

    def _split(self) -> None:
        """Copy the running vectors' entries (views) into the per-key sums and counts."""
        if self._running_sums is None or self._running_counts is None:
            return
        self._sums.update(zip(self._keys, self._running_sums.unbind()))
        self._counts.update(zip(self._keys, self._running_counts.unbind()))

    def _read(self, values: Mapping[str, Tensor | float]) -> dict[str, float]:
        """``values`` as host numbers, the tensors among them read from the device at once."""
        tensors = {key: value for key, value in values.items() if isinstance(value, Tensor)}
        if tensors:
            first = next(iter(tensors.values()))
            tensors = dict(zip(tensors, torch.stack([value.to(first.device) for value in tensors.values()]).tolist()))
        return {key: tensors.get(key, value) for key, value in values.items()}

    def host_counts(self) -> dict[str, int]:
        """The counts, read from the device."""
        return {key: int(count) for key, count in self._read(self.counts).items()}

    def means(self) -> dict[str, Tensor]:
        """Each key's mean over the values it counted (keys without one left out)."""
        counts = self.host_counts()
        return {
            key: (value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float32)) / counts[key]
            for key, value in self.sums.items() if counts[key] > 0
        }

    def saved(self) -> tuple[dict[str, float], dict[str, int], int]:
        """``(sums, counts, steps)`` as host numbers, for a checkpoint (see the constructor)."""
        return {key: float(value) for key, value in self._read(self.sums).items()}, self.host_counts(), self.steps


def left_out_note(keys: Sequence[str], means: Mapping[str, object], step: int, noted: set[str]) -> str | None:
    """A warning naming the keys of a window (``keys``) whose every value was not finite, so that its log
    line at ``step`` (``means``, :meth:`LogWindow.means`) leaves them out; None when there is none.

    Each key is named once a run (``noted`` holds those named, and is updated). The density
    estimator's values are not named: a skipped density update is counted (``skipped_density_updates``).
    ``perturbation_relative_norm`` is the usual one: a step too large for float32 relative to the features.
    """
    left_out = [key for key in keys if key not in means and key not in noted and not key.startswith("density_")]
    if not left_out:
        return None
    noted.update(left_out)
    names = ", ".join(left_out)
    return (f"step {step}: {names} not finite (infinite or NaN) in this log window: left out of metrics.jsonl and "
            "the trackers (named once; a later window whose value is not finite leaves it out too)")


SavedWindow = tuple[dict[str, float], dict[str, int], int]
"""A window as :meth:`LogWindow.saved` gives it and the constructor takes it: ``(sums, counts, steps)``."""


def averaged_window(windows: Sequence[SavedWindow]) -> SavedWindow:
    """The window that each process of a resumed run starts from when the checkpoint holds the windows
    of another number of processes (``windows``, one per saved process; one window is returned as is).

    A log line averages each process's window mean over the processes
    (:func:`~sandbox.processes.collectives.mean_over_processes`), and each process logs its share of a step's
    value (their average is the step's value). Per key, every process therefore starts from the saved
    processes' average mean, as a sum over the largest saved count: where the saved processes counted
    a key equally often (every updated step), the line then logs the mean over the window's steps of
    each step's value, the steps before the resume on the saved processes and those after it on the
    new ones alike, whatever the two numbers of processes. Sums in float32, ``steps`` the largest.
    """
    if len(windows) == 1:
        return windows[0]
    keys = dict.fromkeys(key for sums, counts, _ in windows for key in [*sums, *counts])
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for key in keys:
        means = [window_sums.get(key, 0.0) / window_counts[key]
                 for window_sums, window_counts, _ in windows if window_counts.get(key, 0) > 0]
        counts[key] = max(window_counts.get(key, 0) for _, window_counts, _ in windows)
        sums[key] = float32(counts[key] * math.fsum(means) / len(means)) if means else 0.0
    return sums, counts, max(steps for _, _, steps in windows)
