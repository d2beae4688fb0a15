"""The log window's running sums give what summing each key's values one by one gives, bit for bit."""

from __future__ import annotations

import math
from typing import Mapping

import pytest
import torch
from torch import Tensor

from host_syncs import counting_host_syncs
from sandbox.recipe import TrainSection
from sandbox.train.log_window import LogWindow, averaged_window, is_log_step


class ReferenceWindow:
    """The straightforward window: per key, a float32 sum and an int32 count, one value at a time."""

    def __init__(self, sums: Mapping[str, float] | None = None, counts: Mapping[str, int] | None = None) -> None:
        self.sums: dict[str, Tensor] = {key: torch.tensor(value) for key, value in (sums or {}).items()}
        self.counts: dict[str, Tensor | int] = dict(counts or {})

    def add(self, logs: Mapping[str, Tensor | float]) -> None:
        for key, value in logs.items():
            value = torch.as_tensor(value).detach().float()
            finite = torch.isfinite(value)
            self.sums[key] = self.sums.get(key, 0.0) + torch.where(finite, value, 0.0)
            self.counts[key] = self.counts.get(key, 0) + finite.int()

    def means(self) -> dict[str, float]:
        return {key: float(value / int(self.counts[key])) for key, value in self.sums.items() if int(self.counts[key]) > 0}

    def saved(self) -> tuple[dict[str, float], dict[str, int]]:
        return {key: float(value) for key, value in self.sums.items()}, {key: int(c) for key, c in self.counts.items()}


def logged_steps(count: int) -> list[dict[str, Tensor | float]]:
    """``count`` steps' logs whose keys change between steps, some values not finite, ``density_lr`` a
    host float and ``density_nll`` once a host NaN (no pixels); sums whose rounding depends on the order."""
    generator = torch.Generator().manual_seed(0)
    key_sets = [("loss", "nll"), ("loss",), ("loss", "nll", "accuracy"), ("loss", "nll", "accuracy"), ("accuracy", "loss")]
    steps: list[dict[str, Tensor | float]] = []
    for index in range(count):
        keys = key_sets[index % len(key_sets)] if index < 2 * len(key_sets) else key_sets[2]
        scale = torch.tensor([1e4, 1.0, 1e-4])[torch.randint(0, 3, (), generator=generator)]
        logs: dict[str, Tensor | float] = {key: torch.randn((), generator=generator) * scale for key in keys}
        if index % 7 == 3:
            logs[keys[-1]] = torch.tensor(math.nan)
        if index % 11 == 5:
            logs[keys[0]] = torch.tensor(-math.inf)
        if "nll" in logs:
            logs["density_lr"] = 0.01 * 0.9**index
        if index == 9:
            logs["nll"] = math.nan  # an estimator update without pixels
        if index == 12:
            logs["int_value"] = torch.tensor(16_777_217)  # rounded to float32 as the reference does
        steps.append(logs)
    return steps


def assert_same(window: LogWindow, reference: ReferenceWindow) -> None:
    means = window.means()
    assert all(isinstance(value, Tensor) for value in means.values())
    assert {key: float(value) for key, value in means.items()} == reference.means()
    sums, counts, _ = window.saved()
    assert (sums, counts) == reference.saved()
    assert list(sums) == list(reference.saved()[0]), "the keys in the order they first came"


def test_running_sums_equal_per_key_sums_bit_for_bit() -> None:
    steps = logged_steps(30)
    for length in (1, 2, 3, 5, 10, 13, 30):
        window, reference = LogWindow(), ReferenceWindow()
        for logs in steps[:length]:
            window.add(logs)
            reference.add(logs)
        assert_same(window, reference)
    appearances = {key: sum(key in logs for logs in steps) for key in reference.saved()[1]}
    assert all(reference.saved()[1][key] < appearances[key] for key in ("loss", "nll", "accuracy")), "some values left out"


def test_reading_a_window_midway_changes_nothing() -> None:
    window, reference = LogWindow(), ReferenceWindow()
    for index, logs in enumerate(logged_steps(20)):
        window.add(logs)
        reference.add(logs)
        if index % 3 == 0:
            assert_same(window, reference)
    assert_same(window, reference)


@pytest.mark.parametrize("stop", [1, 2, 4, 9, 14])
def test_a_window_resumed_from_saved_continues_identically(stop: int) -> None:
    steps = logged_steps(20)
    window, reference = LogWindow(), ReferenceWindow()
    for logs in steps[:stop]:
        window.add(logs)
        reference.add(logs)
    sums, counts, window_steps = window.saved()
    resumed = LogWindow(sums, counts, window_steps)
    for logs in steps[stop:]:
        resumed.add(logs)
        reference.add(logs)
    assert_same(resumed, reference)


def test_a_key_whose_every_value_was_left_out_is_saved_but_not_logged() -> None:
    window, reference = LogWindow(), ReferenceWindow()
    for logs in ({"loss": torch.tensor(1.0), "nll": torch.tensor(math.inf)}, {"loss": torch.tensor(2.0), "nll": math.nan}):
        window.add(logs)
        reference.add(logs)
    assert set(window.means()) == {"loss"}
    assert window.saved() == ({"loss": 3.0, "nll": 0.0}, {"loss": 2, "nll": 0}, 0)
    assert_same(window, reference)


def test_adding_steps_with_changing_keys_never_reads_the_device() -> None:
    window, steps = LogWindow({"loss": 1.0}, {"loss": 1}, 3), logged_steps(12)
    with counting_host_syncs() as syncs:
        for logs in steps:
            window.add(logs)
    assert not syncs.calls, syncs.summary()


def test_the_log_step_is_the_loops() -> None:
    settings = TrainSection(iters=25, warmup_iters=0, log_every=10)
    assert [step for step in range(25) if is_log_step(step, settings)] == [9, 19, 24]


def test_a_checkpoint_gives_each_process_its_own_window_and_another_world_size_their_average(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each rank of as many processes loads its own window; one process (or three) loads the windows'
    average; a checkpoint without ``log_windows`` (before they were saved) loads its one window."""
    from sandbox.train import loop

    windows = [{"sums": {"loss": 6.0, "nll": 1.0}, "counts": {"loss": 2, "nll": 1}, "steps": 3},
               {"sums": {"loss": 2.0, "accuracy": 0.5}, "counts": {"loss": 2, "accuracy": 1}, "steps": 3}]
    saved = {**loop.TrainingState(step=3).state_dict(), "log_windows": windows}

    def loaded(state: dict, rank: int, processes: int) -> loop.TrainingState:
        monkeypatch.setattr(loop, "process_rank", lambda: rank)
        monkeypatch.setattr(loop, "process_count", lambda: processes)
        training = loop.TrainingState()
        training.load_state_dict(state)
        assert training.step == 3 and not hasattr(training, "log_windows")
        return training

    for rank in (0, 1):
        state = loaded(saved, rank, 2)
        assert (state.log_sums, state.log_counts, state.log_steps) == tuple(windows[rank].values())
    average = ({"loss": 4.0, "nll": 1.0, "accuracy": 0.5}, {"loss": 2, "nll": 1, "accuracy": 1}, 3)
    for rank, processes in ((0, 1), (2, 3)):
        state = loaded(saved, rank, processes)
        assert (state.log_sums, state.log_counts, state.log_steps) == average
    old = {key: value for key, value in saved.items() if key != "log_windows"}
    old.update(log_sums={"loss": 1.5}, log_counts={"loss": 1}, log_steps=1)
    for rank, processes in ((0, 1), (1, 2)):
        state = loaded(old, rank, processes)
        assert (state.log_sums, state.log_counts, state.log_steps) == ({"loss": 1.5}, {"loss": 1}, 1)


def test_a_window_of_two_processes_resumed_on_one_logs_the_mean_of_each_steps_process_average() -> None:
    """Two processes log a window's first steps, one process its last: the resumed line is the mean over
    the window's steps of each step's value (the processes' average), as a run on one number of
    processes would log it; so is a window of one process resumed on two."""
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(2, 5, generator=generator) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1e3])  # process x step
    step_values = values.mean(0)  # what one process would log for each step
    before = []
    for process in range(2):
        window = LogWindow()
        for step in range(3):
            window.add({"loss": values[process, step]})
        before.append(window.saved())
    resumed = LogWindow(*averaged_window(before))
    for step in (3, 4):
        resumed.add({"loss": step_values[step]})
    assert float(resumed.means()["loss"]) == pytest.approx(float(step_values.mean()), rel=1e-6)
    assert averaged_window(before[:1]) is before[0], "one window is taken as it is"

    one = LogWindow()
    for step in range(3):
        one.add({"loss": step_values[step]})
    means = []
    for process in range(2):  # each process of the resumed run, then the line's average over them
        window = LogWindow(*averaged_window([one.saved()]))
        for step in (3, 4):
            window.add({"loss": values[process, step]})
        means.append(float(window.means()["loss"]))
    assert sum(means) / 2 == pytest.approx(float(step_values.mean()), rel=1e-6)
