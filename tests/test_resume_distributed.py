"""``--resume`` on several processes: they agree on the checkpoint that loads before any is renamed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_distributed import accelerate_command, finish, free_port, launch_env, start

RUN = ("runs", "tiny", "seed3")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe trained once on one process (checkpoints at steps 3 and 6)."""
    from conftest import TINY_RECIPE
    from sandbox.cli import main

    root = tmp_path_factory.mktemp("resume")
    recipe = root / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(output_dir=(root / "runs").as_posix()))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(recipe), "--set", "train.threads=1"])
    assert exit_info.value.code == 0
    return root


REPETITIONS = [0] + [pytest.param(index, marks=pytest.mark.slow) for index in range(1, 5)]


@pytest.mark.parametrize("repetition", REPETITIONS)
def test_two_processes_resume_from_the_checkpoint_before_a_damaged_one(
    finished_run: Path, tmp_path: Path, repetition: int
) -> None:
    """The newest checkpoint's model file is truncated: both processes find it damaged, fall back to
    step 3 together, and only then is it renamed (the slow marks repeat the race five times)."""
    root = tmp_path / "copy"
    shutil.copytree(finished_run, root)
    run_dir = root.joinpath(*RUN)
    recipe = root / "tiny.toml"
    for path in (recipe, run_dir / "recipe.toml"):  # the copy's own output_dir
        path.write_text(path.read_text().replace(finished_run.as_posix(), root.as_posix()))
    (run_dir / "summary.json").unlink()
    model = run_dir / "checkpoints" / "step_00000006" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    log = tmp_path / "resume.log"
    command = accelerate_command("--num_processes", "2", "--main_process_port", str(free_port()),
                                 "-m", "sandbox", "run", str(recipe), "--resume", "--set", "train.threads=1")
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
