"""Failures on several processes (2 CPU gloo processes): scoped to a launch attempt, shared in every
phase, and processes failing by themselves seconds apart stay in step (``sandbox.processes.failures``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from launching import LAUNCH_TIMEOUT_S, accelerate_command, free_port, launch_env, start, wait_bounded
from test_distributed import OUR_FRAME, two_machines_fail

PLUGIN = '''
"""A perturbation that fails where it is told to (a test plugin)."""
import os
import time

import torch

from sandbox.api import Perturbation, hookimpl


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Planted(Perturbation):
    """Identity; raises ``RuntimeError("planted failure")`` on call ``call`` on ``only_rank`` (-1: every
    process; -2: none), after ``delay_s`` seconds on ``delay_rank``, in launch attempt ``attempt`` only
    (-1: every attempt); ``to_rank``: raises when moved to its device (after ``accelerator.prepare``);
    ``eval_call`` (>= 0): evaluation's ``predict`` raises on its call ``eval_call`` on every process,
    ``delay_rank`` sleeping ``delay_s`` before each of its calls up to that one; ``scenario``: one of
    ``SCENARIOS``, settings by name."""

    SCENARIOS = {
        "train_seconds_apart": {"delay_rank": 1, "delay_s": 2.0},
        "eval_seconds_apart": {"only_rank": -2, "delay_rank": 0, "delay_s": 2.0, "eval_call": 3},
        "none": {"only_rank": -2},
    }
    """Named settings (``scenario``), so that one grid axis of a sweep tries them one after another."""

    def __init__(self, call: int = 1, only_rank: int = -1, delay_rank: int = -1, delay_s: float = 0.0,
                 attempt: int = -1, to_rank: int = -1, eval_call: int = -1, scenario: str = "") -> None:
        super().__init__()
        if scenario:
            settings = self.SCENARIOS[scenario]
            only_rank, delay_rank = settings.get("only_rank", only_rank), settings.get("delay_rank", delay_rank)
            delay_s, eval_call = settings.get("delay_s", delay_s), settings.get("eval_call", eval_call)
        self.call, self.only_rank, self.count = call, only_rank, 0
        self.delay_rank, self.delay_s, self.attempt, self.to_rank = delay_rank, delay_s, attempt, to_rank
        if eval_call >= 0:
            self._plant_in_evaluation(eval_call)

    def _plant_in_evaluation(self, failing_call: int) -> None:
        import sandbox.train.evaluate as evaluate
        original, calls = evaluate.predict, iter(range(failing_call + 1))

        def predict(model, images, settings):
            call = next(calls, None)
            if call is not None and rank() == self.delay_rank:
                time.sleep(self.delay_s)
            if call == failing_call:
                evaluate.predict = original
                raise RuntimeError("planted failure in evaluation")
            return original(model, images, settings)

        evaluate.predict = predict

    def _apply(self, fn, *args, **kwargs):
        if self.to_rank == rank():
            raise RuntimeError(f"planted failure while moving to the device")
        return super()._apply(fn, *args, **kwargs)

    def forward(self, features: torch.Tensor, context: object) -> torch.Tensor:
        call, self.count = self.count, self.count + 1
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if call == self.call and self.only_rank in (-1, rank()) and self.attempt in (-1, int(attempt)):
            if rank() == self.delay_rank:
                time.sleep(self.delay_s)
            raise RuntimeError("planted failure")
        return features * 1.0


@hookimpl
def sandbox_register_perturbations(register) -> None:
    register("planted", Planted)
'''


def planted(tmp_path: Path, **settings: object) -> list[str]:
    """``--plugin`` and ``--set`` arguments for the ``planted`` perturbation."""
    plugin = tmp_path / "planted_perturbation.py"
    plugin.write_text(PLUGIN)
    arguments = ["--plugin", str(plugin), "--set", "perturbation.name=planted"]
    for key, value in settings.items():
        arguments += ["--set", f"perturbation.{key}={value}"]
    return arguments


RAISED = "perturbation 'planted' (from planted_perturbation) raised in forward: RuntimeError: planted failure"


def test_a_restarted_attempt_does_not_see_the_failure_of_the_one_before(tiny_recipe: Path, tmp_path: Path) -> None:
    """``torchrun --max-restarts 1``: attempt 0 fails on process 1; attempt 1 trains to the end."""
    log = tmp_path / "torchrun.log"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "sandbox", "run", str(tiny_recipe),
        "--overwrite", "--set", "train.threads=1", *planted(tmp_path, only_rank=1, attempt=0),
    ]
    started = time.monotonic()
    process = start(command, launch_env(tmp_path), log)
    wait_bounded([process])
    text = log.read_text()
    assert process.returncode == 0, text[-4000:]
    assert time.monotonic() - started < LAUNCH_TIMEOUT_S
    assert (tmp_path / "runs" / "tiny" / "seed3" / "summary.json").is_file()
    assert f"error: training failed after 3 of 6 steps: {RAISED} (on process 1)" in text, "attempt 0 failed"


@pytest.mark.slow  # its twin in the default run: the sweep's train_seconds_apart (below); this is `sandbox run`'s
def test_the_same_error_seconds_apart_is_one_failure(tiny_recipe: Path, tmp_path: Path) -> None:
    """Process 1 fails 2 s after process 0, by itself: neither is stopped by its watcher."""
    lines = two_machines_fail(tiny_recipe, tmp_path, {m: planted(tmp_path, delay_rank=1, delay_s=2) for m in (0, 1)})
    assert lines == [f"error: training failed after 3 of 6 steps: {RAISED}"] * 2


def test_ablate_goes_on_after_the_same_error_seconds_apart_in_training_and_in_a_long_evaluation(
    tiny_recipe: Path, tmp_path: Path
) -> None:
    """One sweep on 2 processes. ``train_seconds_apart``: process 1 raises 2 s after process 0, by
    itself. ``eval_seconds_apart``: process 0 evaluates slowly (2 s a batch) and fails 8 s after process
    1, at the same batch: the evaluation's heartbeat keeps its watcher from ending it (it would after
    ``STUCK_S``, 5 s). Both failures are recorded alike by both processes, and the sweep goes on to
    ``none``, which trains."""
    out = tmp_path / "sweep"
    log = tmp_path / "ablate.log"
    command = accelerate_command(
        "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
        "-m", "sandbox", "ablate", str(tiny_recipe), *planted(tmp_path),
        "--grid", "perturbation.scenario=train_seconds_apart,eval_seconds_apart,none", "--set", "dataset.num_val=8",
        "--set", "train.threads=1", "--output", str(out),
    )
    started = time.monotonic()
    wait_bounded([start(command, launch_env(tmp_path), log)])
    assert time.monotonic() - started < LAUNCH_TIMEOUT_S
    text = log.read_text()
    assert "exitcode  : 1" in text, text[-3000:]  # a failed run makes the sweep exit 1 after the others
    runs = out / "tiny"
    failed = (runs / "perturbation.scenario=train_seconds_apart" / "seed3" / "FAILED").read_text()
    assert failed == f"training failed after 3 of 6 steps: {RAISED}\n"
    assert text.count("perturbation.scenario=train_seconds_apart seed3: FAILED") == 2, "both processes record it and go on"
    failed = (runs / "perturbation.scenario=eval_seconds_apart" / "seed3" / "FAILED").read_text()
    assert "RuntimeError: planted failure in evaluation" in failed, failed
    assert "ProcessGroupLost" not in text and "stopped" not in failed, text[-3000:]
    assert text.count("perturbation.scenario=eval_seconds_apart seed3: FAILED") == 2, "both processes record it and go on"
    assert (runs / "perturbation.scenario=none" / "seed3" / "summary.json").is_file(), "the sweep went on"
    assert not any(line.startswith("error:") for line in text.splitlines()), text[-3000:]
    assert not OUR_FRAME.search(text), text[-3000:]


@pytest.mark.slow  # its twin in the default run: the sweep that a construction failure ends (below)
def test_a_failure_after_the_agreed_set_up_on_one_process_ends_both(tiny_recipe: Path, tmp_path: Path) -> None:
    """Process 1 fails moving a module to its device, after ``accelerator.prepare``; process 0 is then
    inside the next collective, which process 1 never reaches."""
    started = time.monotonic()
    lines = two_machines_fail(tiny_recipe, tmp_path, {m: planted(tmp_path, to_rank=1) for m in (0, 1)})
    assert time.monotonic() - started < 90, "ended within seconds, not at a timeout"
    assert lines[0] == lines[1] == "error: RuntimeError: planted failure while moving to the device (on process 1)"


def test_ablate_ends_when_a_failure_during_construction_stops_a_peer(tiny_recipe: Path, tmp_path: Path) -> None:
    """Process 1 fails building the first run's trainer (after ``accelerator.prepare``) while process 0
    waits for it: process 0 is ended by its watcher (the run recorded as failed) and the sweep ends on
    both with the same line, instead of process 1 going on to the next run alone."""
    out = tmp_path / "sweep"
    log = tmp_path / "ablate.log"
    command = accelerate_command("--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                                 "-m", "sandbox", "ablate", str(tiny_recipe), *planted(tmp_path),
                                 "--grid", "perturbation.to_rank=1,-1", "--set", "train.threads=1", "--output", str(out))
    started = time.monotonic()
    wait_bounded([start(command, launch_env(tmp_path), log)])
    assert time.monotonic() - started < LAUNCH_TIMEOUT_S
    text = log.read_text()
    line = "error: RuntimeError: planted failure while moving to the device (on process 1)"
    assert [entry for entry in text.splitlines() if entry.startswith("error:")] == [line] * 2, text[-3000:]
    runs = out / "tiny"
    assert (runs / "perturbation.to_rank=1" / "seed3" / "FAILED").read_text() == line[len("error: "):] + "\n"
    assert not (runs / "perturbation.to_rank=-1" / "seed3" / "summary.json").exists(), "no process went on alone"
    assert not OUR_FRAME.search(text), text[-3000:]


def test_an_error_of_one_process_names_it(monkeypatch, capsys) -> None:
    """A one-line error raised by process 1 alone, outside every agreed phase, says which process it
    was; an error every process raised together is printed as it is."""
    from sandbox import cli
    from sandbox.errors import SandboxError, shared_error

    ended = []
    monkeypatch.setattr(cli, "in_process_group", lambda: True)
    monkeypatch.setattr("torch.distributed.get_rank", lambda: 1)
    monkeypatch.setattr("sandbox.processes.failures.exit_together", lambda code, message=None: ended.append((code, message)))
    for error, printed in ((SandboxError("disk full"), "disk full (on process 1)"), (shared_error("bad"), "bad")):
        def fail(**_: object) -> None:
            raise error

        monkeypatch.setattr(cli, "app", fail)
        cli.main(["run", "x.toml"])
        assert capsys.readouterr().err == f"error: {printed}\n"
        assert ended.pop() == (2, printed)


def test_a_stalled_store_cannot_stretch_a_store_call(monkeypatch, capsys) -> None:
    """A store host that accepts connections but never answers: connecting gives up within
    ``STORE_CALL_S`` (one warning line), and any call is abandoned at its deadline."""
    import socket

    import pytest

    from sandbox.processes import failures

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # the kernel accepts; nobody ever reads or answers
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.getsockname()[1]))
    failures.launch_store.cache_clear()
    started = time.monotonic()
    try:
        assert failures.launch_store() is None
    finally:
        failures.launch_store.cache_clear()
        server.close()
    assert time.monotonic() - started < failures.STORE_CALL_S + 1
    assert "is not reachable" in capsys.readouterr().err

    started = time.monotonic()
    with pytest.raises(failures.StoreUnreachable):
        failures.bounded(time.sleep, 30, timeout=0.5)  # a call that would block for 30 s
    assert time.monotonic() - started < 2


def test_a_failed_run_flushes_its_trackers_and_removes_temporaries(tiny_recipe: Path, tmp_path: Path, monkeypatch) -> None:
    """What a process does before it reports a failure (here on one process): trackers finished,
    the temporary files of interrupted writes removed."""
    import pytest

    from sandbox.cli import main
    from sandbox.rundir.directory import RunDirectory

    finished = []
    append = RunDirectory.append_metrics

    def interrupted(self: RunDirectory, record: dict) -> None:
        append(self, record)
        if record.get("step") == 4:  # as if a write was cut short: its temporary file is left
            (self.path / ".metrics.jsonl.tmp.interrupted").write_text("{")
            raise OSError(28, "No space left on device")

    from accelerate.tracking import TensorBoardTracker

    monkeypatch.setattr(RunDirectory, "append_metrics", interrupted)
    monkeypatch.setattr(TensorBoardTracker, "finish", lambda self: finished.append(True))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--set", 'train.trackers=["tensorboard"]'])
    assert exit_info.value.code == 2
    run_dir = tmp_path / "runs" / "tiny" / "seed3"
    assert (run_dir / "metrics.jsonl").is_file()
    assert not list(run_dir.glob(".*.tmp.*")), "temporary files removed"
    assert finished, "the tracker was finished"
