"""Reliability: kill -9 and resume, damaged checkpoints, non-finite values, overwriting a run."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sandbox.cli import main
from sandbox.plugins import load_registry
from run_records import assert_same_run, records
from sandbox.rundir.directory import verify_checkpoint

RUN = ("tiny", "seed3")


def cli(*args: str) -> None:
    """Run the CLI in this process; it must succeed."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 0


def fails(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the CLI in this process; it must fail with status 2 and one ``error:`` line (returned), no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def forget_the_end(run_dir: Path) -> None:
    """What a kill during the last iterations leaves out: the summary and the final weights."""
    (run_dir / "summary.json").unlink()
    (run_dir / "last.pt").unlink()


# -- kill -9 at any moment, then --resume ---------------------------------------------------------


def test_kill_9_during_training_then_resume_matches_an_uninterrupted_run(tiny_recipe: Path, tmp_path: Path) -> None:
    overrides = ["--set", "train.iters=8", "--set", "train.checkpoint_every=2", "--set", "train.threads=1"]
    reference = tmp_path / "reference"
    cli("run", str(tiny_recipe), *overrides, "--set", f"output_dir={reference.as_posix()}")

    run_dir = tmp_path.joinpath("runs", *RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "run", str(tiny_recipe), *overrides],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )
    try:
        while not list(run_dir.glob("checkpoints/step_*/COMPLETE")):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 1.0))  # a random-ish moment: mid-step, mid-eval or mid-checkpoint
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.stderr:
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "the run finished before the kill: nothing was tested"
    assert not (run_dir / "summary.json").exists()

    cli("run", str(tiny_recipe), *overrides, "--resume")
    assert_same_run(reference.joinpath(*RUN), run_dir)
    assert all((folder / "COMPLETE").is_file() for folder in (run_dir / "checkpoints").iterdir())


def test_a_checkpoint_without_its_marker_is_ignored_and_removed(
    tiny_recipe: Path, trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = trained_tiny_run
    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    checkpoints = run_dir / "checkpoints"
    # A kill during save_state: step 6's files are there (one half written), its marker is not.
    (checkpoints / "step_00000006" / "COMPLETE").unlink()
    model_file = checkpoints / "step_00000006" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    stray = checkpoints / "step_00000005"
    stray.mkdir()
    (stray / "optimizer.bin").write_bytes(b"half")
    staged = checkpoints / ".staging.0123456789abcdef" / "step_00000007"  # a holder killed while staging
    staged.mkdir(parents=True)
    (staged / "optimizer.bin").write_bytes(b"half")
    forget_the_end(run_dir)
    capsys.readouterr()

    cli("run", str(tiny_recipe), "--resume")
    assert "warning" not in capsys.readouterr().err  # not a damaged checkpoint: never counted
    assert not stray.exists() and not staged.parent.exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003", "step_00000006"]
    assert_same_run(reference, run_dir)


class Payload:
    """A pickle that would run code when loaded with ``weights_only=False``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (Path.write_text, (self.marker, "executed"))


@pytest.mark.parametrize("damage", ["truncated model", "truncated custom state", "unsafe pickle"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(
    damage: str, tiny_recipe: Path, trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = trained_tiny_run
    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    last = run_dir / "checkpoints" / "step_00000006"
    marker = tmp_path / "executed.txt"
    if damage == "truncated model":
        data = (last / "model.safetensors").read_bytes()
        (last / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "truncated custom state":
        data = (last / "custom_checkpoint_1.pkl").read_bytes()
        (last / "custom_checkpoint_1.pkl").write_bytes(data[: len(data) // 2])
    else:
        torch.save({"step": Payload(marker)}, last / "custom_checkpoint_1.pkl")
    forget_the_end(run_dir)
    capsys.readouterr()

    cli("run", str(tiny_recipe), "--resume")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step_00000006 could not be loaded" in warnings[0]
    assert "resuming from step_00000003" in warnings[0]
    assert not marker.exists(), "a checkpoint file was unpickled with arbitrary objects allowed"
    assert (run_dir / "checkpoints" / "corrupt-step_00000006").is_dir()
    assert_same_run(reference, run_dir)


class Terminated(BaseException):
    """What the test's SIGTERM handler raises: it stands for SIGTERM's default, the end of the process."""


def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(
    trained_tiny_run: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (KeyboardInterrupt in the main thread) while step 6's checkpoint is written prints the line
    SIGTERM prints, then stops as Ctrl-C does; it printed nothing before."""
    from sandbox.train import loop

    run_dir = trained_tiny_run
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    forget_the_end(run_dir)
    fsync_tree = loop.fsync_tree

    def interrupted_while_writing(folder: Path) -> None:
        if folder.name == "step_00000006":
            raise KeyboardInterrupt
        fsync_tree(folder)

    monkeypatch.setattr(loop, "fsync_tree", interrupted_while_writing)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(["run", str(run_dir / "recipe.toml"), "--resume"])
    stopped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stopped by")]
    assert stopped == [f"stopped by Ctrl-C at step 6 of 6 while writing checkpoint step_00000006 (not complete); "
                       f"--resume continues from step_00000003: sandbox run {run_dir / 'recipe.toml'} --resume "
                       "(a sweep's run: rerun its sandbox ablate command)"]


def test_sigterm_during_a_checkpoint_says_where_the_run_stopped_and_how_to_resume(
    trained_tiny_run: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (scancel, a time limit, kill) while step 6's checkpoint is written, resumed from step 3:
    one line says where the run stopped and the command that resumes it."""
    from sandbox.train import loop

    run_dir = trained_tiny_run
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    forget_the_end(run_dir)
    fsync_tree = loop.fsync_tree

    def terminated_while_writing(folder: Path) -> None:
        if folder.name == "step_00000006":  # its files written, its COMPLETE marker not yet
            os.kill(os.getpid(), signal.SIGTERM)
        fsync_tree(folder)

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    monkeypatch.setattr(loop, "fsync_tree", terminated_while_writing)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.raises(Terminated):
            main(["run", str(run_dir / "recipe.toml"), "--resume"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    command = f"sandbox run {run_dir / 'recipe.toml'} --resume"
    stopped = [line for line in capsys.readouterr().err.splitlines() if "SIGTERM" in line]
    assert stopped == [f"stopped by SIGTERM at step 6 of 6 while writing checkpoint step_00000006 (not complete); "
                       f"--resume continues from step_00000003: {command} (a sweep's run: rerun its sandbox ablate command)"]
    assert not (run_dir / "summary.json").exists()
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()] == ["step_00000003"]

    # The printed command resumes this run (resuming past an unpublished checkpoint: the tests above).
    from sandbox.recipe import load_resolved_recipe
    from sandbox.recipe import recipe_difference
    from sandbox.rundir.directory import RunDirectory

    saved = Path(command.split(" ")[2])
    resolved, _ = load_resolved_recipe(saved, [], [])
    assert RunDirectory.for_recipe(resolved).path == run_dir and recipe_difference(saved.read_text(), resolved) == ""


def test_retention_keeps_the_newest_checkpoints_and_a_finished_run_may_drop_them(
    trained_tiny_run: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.checkpoints_kept = 1`` and ``train.keep_checkpoints_when_done = false``, resumed from step 3: while
    training only the newest checkpoint stays; once finished none does (best.pt, last.pt and the records do),
    and a --resume of the finished run is a one-line error, not a new run from step 0."""
    from sandbox.rundir.directory import RunDirectory

    run_dir = trained_tiny_run
    recipe = run_dir / "recipe.toml"
    defaults = "\ncheckpoints_kept = 2\nkeep_checkpoints_when_done = true\n"
    assert recipe.read_text().count(defaults) == 1, "the saved recipe holds both settings"
    recipe.write_text(recipe.read_text().replace(defaults, "\ncheckpoints_kept = 1\nkeep_checkpoints_when_done = false\n"))
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    forget_the_end(run_dir)
    at_summary: list[list[str]] = []
    write_summary = RunDirectory.write_summary

    def recording(self: RunDirectory, summary: dict[str, Any]) -> None:
        at_summary.append([folder.name for folder in self.complete_checkpoints()])
        write_summary(self, summary)

    monkeypatch.setattr(RunDirectory, "write_summary", recording)
    cli("run", str(recipe), "--resume")
    assert at_summary == [["step_00000006"]], "one checkpoint kept while training"
    assert not (run_dir / "checkpoints").exists(), "none once the run finished"
    assert all((run_dir / name).is_file() for name in ("best.pt", "last.pt", "summary.json", "metrics.jsonl"))

    metrics = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    error = fails(capsys, "run", str(recipe), "--resume")
    assert error == (f"error: --resume: run {run_dir} is finished (summary.json) and kept no checkpoint to resume "
                     "(train.keep_checkpoints_when_done = false); nothing to do (--overwrite trains it again)")
    assert (run_dir / "metrics.jsonl").read_text() == metrics, "its records untouched"


# -- non-finite values ----------------------------------------------------------------------------

NAN_PLUGIN = '''
import torch
from sandbox.api import Perturbation, hookimpl


class NanOnCalls(Perturbation):
    """Identity, but NaN features on the listed calls (0-based; -1: every call)."""

    def __init__(self, calls: list[int] = [-1]) -> None:
        super().__init__()
        self.calls = calls
        self.count = 0

    def forward(self, features, context):
        poisoned = -1 in self.calls or self.count in self.calls
        self.count += 1
        return features * float("nan") if poisoned else features * 1.0


class NanOnCallsWithDensity(NanOnCalls):
    """The same, with a density estimator trained at every step (as DDFP's)."""

    uses_density = True


@hookimpl
def sandbox_register_perturbations(register):
    register("nan_on_calls", NanOnCalls)
    register("nan_on_calls_density", NanOnCallsWithDensity)
'''


@pytest.fixture
def nan_plugin(tmp_path: Path) -> Path:
    path = tmp_path / "nan_perturbation.py"
    path.write_text(NAN_PLUGIN)
    yield path
    sys.modules.pop("nan_perturbation", None)


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_non_finite_losses_skip_the_update_and_are_counted(
    tiny_recipe: Path, tmp_path: Path, nan_plugin: Path, capsys: pytest.CaptureFixture
) -> None:
    # Steps 2..5 perturb; calls 1 and 2 (steps 3 and 4) give NaN features, hence a NaN loss.
    cli("run", str(tiny_recipe), "--plugin", str(nan_plugin), "--set", "perturbation.name=nan_on_calls",
        "--set", "perturbation.calls=[1,2]")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert [line.split(":")[1].strip() for line in warnings] == ["step 4", "step 5"], warnings
    assert all("non-finite loss_perturbed: the perturbed view of perturbation 'nan_on_calls' (from nan_perturbation)"
               in line and "update skipped" in line for line in warnings), warnings
    run_dir = tmp_path.joinpath("runs", *RUN)
    train = [r for r in records(run_dir) if "loss" in r or "skipped_updates" in r]
    assert [r["skipped_updates"] for r in train] == [0, 1, 2]
    assert all(r["loss"] == r["loss"] for r in train if "loss" in r), "a NaN reached the logged losses"
    assert json.loads((run_dir / "summary.json").read_text())["skipped_updates"] == 2
    for name in ("last.pt", "best.pt"):
        assert all_finite(torch.load(run_dir / name, weights_only=True)["model"]), name
    student = load_file(run_dir / "checkpoints" / "step_00000006" / "model.safetensors")
    assert all_finite(student), "the skipped steps' BatchNorm statistics must be forgotten"


def everything_a_step_may_change(trainer: Any) -> dict[str, torch.Tensor]:
    """Copies of every tensor of the student (parameters, buffers, optimizer state), the teacher and the
    density estimator (parameters, buffers, Adam's state), and the estimator's schedule, by name."""
    from sandbox.train.student_pass import network_of

    student = network_of(trainer.accelerator.unwrap_model(trainer.model))
    state = {f"student {k}": v for k, v in student.state_dict().items()}
    state |= {f"teacher {k}": v for k, v in trainer.teacher.state_dict().items()}
    for index, moments in trainer.optimizer.state_dict()["state"].items():
        state |= {f"optimizer {index} {k}": v for k, v in moments.items() if isinstance(v, torch.Tensor)}
    density = trainer.method.density
    state |= {f"density {k}": v for k, v in density.state_dict().items()}
    for index, moments in density.optimizer.state_dict()["state"].items():
        state |= {f"density Adam {index} {k}": v for k, v in moments.items() if isinstance(v, torch.Tensor)}
    state["density lr"] = torch.tensor(density.optimizer.param_groups[0]["lr"])
    state["density schedule"] = torch.tensor(float(density.scheduler.last_epoch))
    return {k: v.detach().clone() for k, v in state.items()}


ACCUMULATING = ["train.total_batch_size=4", "train.loss_pixel_count=per_process"]
"""Two micro-batches of 2 + 2 a step on one process."""


@pytest.mark.parametrize(
    ("calls", "extra"), [([0], []), ([2], []), ([1], ACCUMULATING)], ids=["first-density-update", "later", "second-micro-batch"]
)
def test_a_skipped_step_leaves_no_trace(tiny_recipe: Path, nan_plugin: Path, calls: list[int], extra: list[str]) -> None:
    """A NaN perturbed view makes the loss non-finite after the step's forward pass updated BatchNorm
    statistics and the density estimator: every tensor of the student, its optimizer, the teacher and
    the estimator (and its schedule) is as before the step. ``calls`` [0]: the first semi-supervised
    step, whose estimator update is its first (Adam's state appears) and whose teacher starts then
    (as the student: that start stays, or the teacher would never start). ``second-micro-batch``: the first
    semi-supervised step accumulates 2 micro-batches and the second one's loss is not finite: what the
    first one changed (statistics, the estimator's update, its gradients) is put back too."""
    from sandbox.recipe import load_resolved_recipe
    from sandbox.train.loop import start_run

    settings = ["perturbation.name=nan_on_calls_density", f"perturbation.calls={calls}", "train.teacher_mode=train",
                "train.teacher_statistics=own", *extra]
    recipe, registry = load_resolved_recipe(tiny_recipe, settings, [str(nan_plugin)])
    trainer = start_run(recipe, registry, resume=False, overwrite=True)
    iteration, skipped = trainer.iteration, []
    accumulate = iteration.accumulate

    def compared(step: int, micro_batches: Any) -> Any:
        before = everything_a_step_may_change(trainer)
        if step == recipe.train.warmup_iters:  # the teacher starts as the student at this step, skipped or not
            before |= {f"teacher {name}": before[f"student {name}"] for name, _ in trainer.teacher.named_parameters()}
        result = accumulate(step, micro_batches)
        if not result.finite:
            after = everything_a_step_may_change(trainer)
            assert set(after) == set(before), f"step {step}: {set(after) ^ set(before)}"
            changed = [k for k, v in before.items() if not torch.equal(after[k].nan_to_num(), v.nan_to_num())]
            assert not changed, f"step {step} was skipped but changed {changed}"
            skipped.append(step)
        return result

    iteration.accumulate = compared
    trainer.train()
    assert len(skipped) == 1, skipped


def test_consecutive_non_finite_losses_stop_the_run_with_a_usable_checkpoint(
    tiny_recipe: Path, tmp_path: Path, nan_plugin: Path, capsys: pytest.CaptureFixture
) -> None:
    err = fails(capsys, "run", str(tiny_recipe), "--plugin", str(nan_plugin), "--set", "perturbation.name=nan_on_calls",
                "--set", "train.max_consecutive_nonfinite=3", "--set", "train.checkpoint_every=100")
    assert err.startswith("error: training stopped at step 5: 3 consecutive non-finite losses")
    checkpoint = tmp_path.joinpath("runs", *RUN, "checkpoints", "step_00000005")
    assert (checkpoint / "COMPLETE").is_file() and checkpoint.as_posix() in err
    verify_checkpoint(checkpoint)
    assert all_finite(load_file(checkpoint / "model.safetensors"))
    teacher = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)
    assert all_finite(teacher)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_a_non_finite_density_nll_skips_the_estimator_update() -> None:
    estimator = load_registry().get("density", "glow").build({"hidden": 8}, feature_dim=4, num_classes=2, total_steps=5)
    before = {k: v.clone() for k, v in estimator.state_dict().items()}
    features = torch.randn(16, 4)
    features[3, 1] = float("inf")
    stats = estimator.fit_step(features, torch.zeros(16, dtype=torch.long))
    assert not math.isfinite(stats["nll"])
    assert all(torch.equal(v, before[k]) for k, v in estimator.state_dict().items())
    stats = estimator.fit_step(torch.randn(16, 4), torch.zeros(16, dtype=torch.long))  # a finite one still trains
    assert any(not torch.equal(v, before[k]) for k, v in estimator.state_dict().items())


def test_an_optimizer_step_skipped_by_amp_never_reaches_the_teacher(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator

    import sandbox.train.iteration as iteration

    decays: list[float] = []
    real_update = iteration.update_teacher
    monkeypatch.setattr(
        iteration,
        "update_teacher",
        lambda teacher, student, decay, statistics: (decays.append(decay), real_update(teacher, student, decay, statistics)),
    )
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))  # as GradScaler on overflow
    cli("run", str(tiny_recipe), "--set", "train.iters=4", "--set", "train.perturbation_start_iters=100")
    assert decays == [0.0], "only the copy at the end of warm-up; no EMA update after a skipped step"
    summary = json.loads(tiny_recipe.parent.joinpath("runs", *RUN, "summary.json").read_text())
    assert summary["skipped_updates"] == 4


# -- an existing run directory ----------------------------------------------------------------------


def test_overwrite_keeps_nothing_stale(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    short = ["--set", "train.iters=2", "--set", "train.warmup_iters=2"]
    cli("run", str(tiny_recipe), *short)
    run_dir = tmp_path.joinpath("runs", *RUN)
    (run_dir / "stale.txt").write_text("old")
    (run_dir / "checkpoints" / "step_00000099").mkdir()
    err = fails(capsys, "run", str(tiny_recipe), *short)
    assert "already exists" in err and str(run_dir) in err
    assert (run_dir / "stale.txt").exists(), "refused: nothing may be touched"

    cli("run", str(tiny_recipe), *short, "--overwrite")
    assert not (run_dir / "stale.txt").exists() and not (run_dir / "checkpoints" / "step_00000099").exists()
    assert [r["step"] for r in records(run_dir)] == [2, 2]  # one training record and one evaluation


@pytest.mark.parametrize(
    "error", [OSError(5, "Input/output error"), MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory")]
)
def test_an_error_that_is_not_the_files_content_leaves_the_checkpoint_alone(
    error: Exception, tiny_recipe: Path, trained_tiny_run: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from accelerate.utils import other

    run_dir = trained_tiny_run
    forget_the_end(run_dir)
    real_load = other.load

    def failing_load(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "custom_checkpoint_1" in str(path):
            raise error
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(other, "load", failing_load)
    capsys.readouterr()
    err = fails(capsys, "run", str(tiny_recipe), "--resume")
    assert "step_00000006" in err and "left as it is" in err and type(error).__name__ in err
    assert (run_dir / "checkpoints" / "step_00000006").is_dir(), "a good checkpoint is never renamed corrupt-*"
    assert not list((run_dir / "checkpoints").glob("corrupt-*"))
