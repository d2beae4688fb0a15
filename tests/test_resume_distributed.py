"""``--resume``: a one-process run resumed on two processes, which agree on the checkpoint that loads
before any is renamed; a one-process run resumed in the middle of a log window logs what it would have
logged uninterrupted (on two processes: ``test_distributed``'s killed ``gmm`` run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launching import accelerate_command, finish, free_port, launch_env, start
from run_records import records
from sandbox.cli import main
from sandbox.recipe import load_recipe
from test_distributed import assert_identical_records, resumed_step

REPETITIONS = [0] + [pytest.param(index, marks=pytest.mark.slow) for index in range(1, 5)]


@pytest.mark.parametrize("repetition", REPETITIONS)
def test_two_processes_resume_a_one_process_run_from_the_checkpoint_before_a_damaged_one(
    tiny_recipe: Path, trained_tiny_run: Path, tmp_path: Path, repetition: int
) -> None:
    """The run trained on one process; its newest checkpoint's model file is truncated: both processes
    find it damaged, fall back to step 3 together, and only then is it renamed (the slow marks repeat
    the race five times). The records after step 3 are written once, by rank 0."""
    run_dir = trained_tiny_run
    (run_dir / "summary.json").unlink()
    model = run_dir / "checkpoints" / "step_00000006" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    log = tmp_path / "resume.log"
    command = accelerate_command("--num_processes", "2", "--main_process_port", str(free_port()),
                                 "-m", "sandbox", "run", str(tiny_recipe), "--resume")
    finish([start(command, launch_env(tmp_path), log)], [log])
    lines = log.read_text().splitlines()
    warnings = [line for line in lines if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and "step_00000006 could not be loaded" in warnings[0], lines[-20:]
    assert "resuming from step_00000003" in warnings[0]
    assert [line for line in lines if line.startswith("resumed from")] == [
        f"resumed from {run_dir / 'checkpoints' / 'step_00000003'} (step 3 of 6)"
    ]
    assert (run_dir / "checkpoints" / "corrupt-step_00000006").is_dir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iters"] == 6 and summary["processes"] == 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(6) == 2, "records after step 3 are written once, by rank 0"


def test_a_one_process_run_resumed_in_the_middle_of_a_log_window_logs_every_value_it_logged_uninterrupted(
    tiny_recipe: Path, trained_tiny_run: Path, capsys: pytest.CaptureFixture
) -> None:
    """The session's run of the tiny recipe (log lines at steps 2, 4 and 6), interrupted after its step-3
    checkpoint (what came later dropped) and resumed: the step-4 line's window began before the
    checkpoint, and every value of every record equals the uninterrupted run's."""
    run_dir = trained_tiny_run
    reference = records(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    (run_dir / "summary.json").unlink()
    (run_dir / "last.pt").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--resume"])
    assert exit_info.value.code == 0
    step = resumed_step(capsys.readouterr().err)
    assert step == 3 and step % load_recipe(tiny_recipe).train.log_every != 0, "resumed in the middle of a window"
    assert_identical_records(reference, records(run_dir))
