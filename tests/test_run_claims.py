"""One run, one writer: ``sandbox run`` claims its run directory as ``sandbox ablate`` does.

Real ``python -m sandbox run`` processes on one run directory: two started at once (one trains, the
other exits 2 naming the holder), ``--overwrite`` of a running run (refused, nothing touched), a run
whose claim is taken over (it stops before its next write) and a SIGKILLed run (its rerun takes the
dead process's claim over at once). The guard of the run directory is tested in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from run_records import records
from sandbox.cli import main
from sandbox.errors import SandboxError
from sandbox.rundir.claims import TIMEOUT_ENV, Claim, claim_path, read_claim, replace_file
from sandbox.rundir.atomic_files import TEMPORARY_MARK
from sandbox.rundir.directory import STAGING_PREFIX, RunDirectory, guarded_writes
from launching import LAUNCH_TIMEOUT_S, launch_env, start, wait_bounded

LONG = ["--set", "train.iters=16", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=8",
        "--set", "train.threads=1"]
"""A run that lasts several seconds after its first checkpoint."""


def run_path(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "tiny" / "seed3"


def command(tiny_recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sandbox", "run", str(tiny_recipe), *LONG, *extra]


def wait_for(condition, process, log: Path) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not condition():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_trained_once(run: Path, iters: int = 16) -> None:
    """Finished, every step logged once, in order, no claim left."""
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert steps == list(range(2, iters + 1, 2)), steps
    assert json.loads((run / "summary.json").read_text())["iters"] == iters
    assert not claim_path(run).exists() and not list(run.glob("CLAIM*"))


def test_two_runs_of_one_run_started_at_once_train_it_once(tiny_recipe: Path, tmp_path: Path) -> None:
    """Both with ``--overwrite`` (neither is refused by an existing directory): before claims, both
    trained in one directory (steps 2,4,6,4,6,...) and one died deleting the other's checkpoints."""
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    processes = []
    try:
        for log in logs:
            processes.append(start(command(tiny_recipe, "--overwrite"), launch_env(tmp_path), log))
    finally:
        wait_bounded(processes)
    texts = [log.read_text() for log in logs]
    codes = sorted(process.returncode for process in processes)
    assert codes == [0, 2], texts
    winner, loser = (0, 1) if processes[0].returncode == 0 else (1, 0)
    errors = error_lines(texts[loser])
    assert len(errors) == 1 and errors[0] == texts[loser].strip().splitlines()[-1], texts[loser]
    holder = f":{processes[winner].pid}"
    assert re.match(rf"error: run directory {re.escape(str(run_path(tmp_path)))} is being trained by \S+{holder}, "
                    r"refreshed \d+ s ago; nothing was changed", errors[0]), errors[0]
    assert "Traceback" not in texts[loser] and "SafetensorError" not in texts[winner]
    assert_trained_once(run_path(tmp_path))


def test_overwrite_or_resume_of_a_running_run_is_refused_and_touches_nothing(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = run_path(tmp_path)
    log = tmp_path / "running.log"
    process = start(command(tiny_recipe), launch_env(tmp_path), log)
    try:
        wait_for(lambda: list(run.glob("checkpoints/step_*/COMPLETE")), process, log)
        metrics = (run / "metrics.jsonl").read_bytes()
        recipe = (run / "recipe.toml").read_bytes()
        for extra in (["--overwrite"], ["--resume"], []):  # in this process: another pid of this machine
            with pytest.raises(SystemExit) as exit_info:
                main(["run", str(tiny_recipe), *LONG, *extra])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2, err
            errors = error_lines(err)
            assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
            assert "is being trained by " in errors[0] and f":{process.pid}, refreshed" in errors[0], errors[0]
            assert read_claim(claim_path(run)).pid == process.pid
            assert process.poll() is None, "the first run is still training"
            assert (run / "metrics.jsonl").read_bytes().startswith(metrics), "its metrics are intact"
            assert (run / "recipe.toml").read_bytes() == recipe
            assert list(run.glob("checkpoints/step_*/COMPLETE")), "its checkpoints are intact"
    finally:
        wait_bounded([process])
    assert process.returncode == 0, log.read_text()[-3000:]
    assert_trained_once(run)


@pytest.mark.slow  # its twin in the default run: the ablate run whose claim is taken over (below)
def test_a_run_whose_claim_is_taken_over_stops_before_its_next_write(tiny_recipe: Path, tmp_path: Path) -> None:
    run = run_path(tmp_path)
    log = tmp_path / "holder.log"
    process = start(command(tiny_recipe), launch_env(tmp_path), log)
    try:
        wait_for(lambda: list(run.glob("checkpoints/step_*/COMPLETE")), process, log)
        now = round(time.time(), 3)
        taker = replace(Claim.new(600, "1/2"), host="node7", pid=4242, claimed_at=now, refreshed_at=now)
        replace_file(claim_path(run), taker.encode())  # this process was deemed dead and taken over
        before = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name != "CLAIM")
        metrics = (run / "metrics.jsonl").read_bytes()
    finally:
        wait_bounded([process])
    text = log.read_text()
    assert process.returncode == 2, text[-3000:]
    errors = error_lines(text)
    assert len(errors) == 1 and errors[0] == text.strip().splitlines()[-1], text[-3000:]
    assert "was taken over (now held by node7:4242 (shard 1/2)): this process stops" in errors[0]
    # at most the write under way when the claim was replaced completed; nothing after it
    after = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name != "CLAIM")
    assert not (run / "summary.json").exists() and not (run / "last.pt").exists()
    assert len((run / "metrics.jsonl").read_bytes().splitlines()) <= len(metrics.splitlines()) + 1
    assert len([p for p in after if p.endswith("COMPLETE")]) <= len([p for p in before if p.endswith("COMPLETE")]) + 1
    assert read_claim(claim_path(run)) == taker, "the taker's claim is left as it is"


def test_an_ablate_run_whose_claim_is_taken_over_stops_leaves_it_to_the_taker_and_goes_on(
    tiny_recipe: Path, tmp_path: Path
) -> None:
    """``sandbox ablate``: the first run's claim is taken over while it trains; that run stops before
    its next write without marking the taker's run FAILED, and the sweep trains the next run."""
    out = tmp_path / "sweep"
    first, second = (out / "tiny" / f"perturbation.name={name}" / "seed3" for name in ("ddfp", "none"))
    log = tmp_path / "ablate.log"
    process = start([sys.executable, "-m", "sandbox", "ablate", str(tiny_recipe), *LONG,
                     "--grid", "perturbation.name=ddfp,none", "--output", str(out)], launch_env(tmp_path), log)
    try:
        wait_for(lambda: list(first.glob("checkpoints/step_*/COMPLETE")), process, log)
        now = round(time.time(), 3)
        taker = replace(Claim.new(600, "1/2"), host="node7", pid=4242, claimed_at=now, refreshed_at=now)
        replace_file(claim_path(first), taker.encode())
    finally:
        wait_bounded([process])
    text = log.read_text()
    assert process.returncode == 1, text[-3000:]  # a run that did not finish here makes the sweep exit 1
    assert ("[1/2] perturbation.name=ddfp seed3: FAILED: the claim "
            f"{claim_path(first)} was taken over (now held by node7:4242 (shard 1/2)): this process stops") in text
    assert not (first / "FAILED").exists() and not (first / "summary.json").exists(), "the taker's run is left alone"
    assert read_claim(claim_path(first)) == taker
    assert (second / "summary.json").is_file() and not claim_path(second).exists(), "the sweep went on"
    assert not error_lines(text), text[-3000:]


def test_a_killed_runs_claim_is_taken_over_at_once_by_its_rerun(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = run_path(tmp_path)
    log = tmp_path / "killed.log"
    process = start(command(tiny_recipe), launch_env(tmp_path), log)
    try:
        wait_for(lambda: list(run.glob("checkpoints/step_*/COMPLETE")), process, log)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        wait_bounded([process])
    assert process.returncode == -signal.SIGKILL
    left = read_claim(claim_path(run))
    assert left is not None and left.pid == process.pid and not left.silent_for() > left.timeout_s
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), *LONG, "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code in (0, None), err
    assert f"took over the stale claim of {left.holder()} on {run}, silent for " in err and ", its process is gone" in err
    assert not claim_path(run).exists()


HOLDER_PAUSED_IN_ITS_SAVE = """
import os, signal, sys
from accelerate import Accelerator
from sandbox.cli import main

real, calls = Accelerator.save_state, []

def save_state(self, output_dir=None, **kwargs):
    calls.append(output_dir)
    if len(calls) == 1:  # its first checkpoint: past the claim's check, before any of its files
        os.kill(os.getpid(), signal.SIGSTOP)
    return real(self, output_dir, **kwargs)

Accelerator.save_state = save_state
main(sys.argv[1:])
"""
"""``sandbox run`` whose process stops itself (SIGSTOP, as swap or a debugger would) inside its first checkpoint."""


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``T``: stopped), from ``/proc``."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2]


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file below ``folder``: its inode, modification time and size (a rewrite changes them)."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process states come from /proc")
def test_a_holder_paused_past_its_timeout_loses_its_own_write_never_a_takers_file(
    tiny_recipe: Path, tmp_path: Path
) -> None:
    """A holder stops (SIGSTOP) right after its claim's check, at the start of a checkpoint, for longer
    than its timeout (3 s); a taker resumes the run and trains; the holder is continued while the
    taker is in the middle of its training (stopped there, so that the run directory holds still).
    The holder must change no file of the taker's, leave nothing behind, and stop with the claim's
    line; the taker then finishes as if alone. Before issue 35 the holder's late ``save_state`` wrote
    straight into ``checkpoints/step_00000002``, over the taker's complete checkpoint of that step
    (this test failed: its files were rewritten)."""
    run = run_path(tmp_path)
    logs = tmp_path / "holder.log", tmp_path / "taker.log"
    short = [*LONG, "--set", "train.iters=8"]
    holder = start([sys.executable, "-c", HOLDER_PAUSED_IN_ITS_SAVE, "run", str(tiny_recipe), *short],
                   {**launch_env(tmp_path), TIMEOUT_ENV: "3"}, logs[0])
    taker = None
    try:
        wait_for(lambda: process_state(holder.pid) == "T", holder, logs[0])
        wait_for(lambda: read_claim(claim_path(run)).is_stale(), holder, logs[0])  # silent 3 s, the server's clock
        taker = start(command(tiny_recipe, "--set", "train.iters=8", "--resume"), launch_env(tmp_path), logs[1])
        wait_for(lambda: (run / "checkpoints" / "step_00000002" / "COMPLETE").is_file(), taker, logs[1])
        os.killpg(taker.pid, signal.SIGSTOP)  # somewhere in its training after step 2
        wait_for(lambda: process_state(taker.pid) == "T", taker, logs[1])
        before = snapshot(run)
        os.killpg(holder.pid, signal.SIGCONT)
        holder.wait(timeout=LAUNCH_TIMEOUT_S)
        after = snapshot(run)
        os.killpg(taker.pid, signal.SIGCONT)
    finally:
        wait_bounded([process for process in (holder, taker) if process is not None])
    text = logs[0].read_text()
    assert holder.returncode == 2, text[-3000:]
    assert error_lines(text) == [text.strip().splitlines()[-1]], text[-3000:]
    assert f"the claim {claim_path(run)} was taken over (now held by " in text and f":{taker.pid}): this process stops" in text
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert changed == [], "the paused holder rewrote or left these files"
    assert taker.returncode == 0, logs[1].read_text()[-3000:]
    assert_trained_once(run, iters=8)


class Fence:
    """A claim's fence for :func:`guarded_writes` that raises from its ``fails_from``-th check on."""

    token = "f" * 32

    def __init__(self, fails_from: int) -> None:
        self.calls, self.fails_from = 0, fails_from

    def check(self) -> None:
        self.calls += 1
        if self.calls >= self.fails_from:
            raise SandboxError("the claim was taken over")


def staged_checkpoint(run_dir: RunDirectory) -> None:
    """Stage a checkpoint of step 2 as the trainer does (its files in the writer's staging folder), then publish it."""
    staged = run_dir.staging_folder() / "step_00000002"
    run_dir.begin_checkpoint(staged)
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"weights")
    run_dir.publish_checkpoint(staged, 2)


WRITES = {
    "metrics-first-line": lambda run_dir: run_dir.append_metrics({"step": 1}),
    "metrics-next-line": lambda run_dir: run_dir.append_metrics({"step": 2}),
    "summary": lambda run_dir: run_dir.write_summary({"iters": 2}),
    "weights": lambda run_dir: run_dir.save_torch({"step": 2}, run_dir.last_weights),
    "checkpoint": staged_checkpoint,
}


def published(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` but the writer's staging folders, with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and STAGING_PREFIX not in str(p)}


@pytest.mark.parametrize("write", WRITES)
def test_the_run_directory_checks_its_fence_before_each_write_and_again_before_publishing_it(
    tmp_path: Path, write: str
) -> None:
    """Each write checks the claim's fence before it begins and right before its content is published
    (the ``rename`` of a file or a staged checkpoint, the ``write`` of a metrics line): a fence that
    fails at either leaves the run directory as it was (nothing published, no temporary file left;
    a checkpoint's staged files are the writer's own, in its staging folder)."""
    path = tmp_path / "run"
    path.mkdir()
    run_dir = RunDirectory(path)
    if write == "metrics-next-line":
        run_dir.append_metrics({"step": 1})
    before = published(path)
    for fails_from in (1, 2):
        fence = Fence(fails_from)
        with guarded_writes(path, fence), pytest.raises(SandboxError, match="taken over"):
            WRITES[write](run_dir)
        assert fence.calls == fails_from
        assert published(path) == before, f"published despite a fence failing at check {fails_from}"
        shutil.rmtree(path / "checkpoints", ignore_errors=True)
    fence = Fence(fails_from=3)
    with guarded_writes(path, fence):
        WRITES[write](run_dir)
    assert fence.calls == 2 and published(path) != before, "a fence that holds lets the write through"
    assert not list(path.rglob(f"*{TEMPORARY_MARK}*")) and not list(path.rglob(f"{STAGING_PREFIX}*"))
    RunDirectory(path).check_writable()  # the fence (whose next check fails) ended with the block


@pytest.mark.slow  # the claim's release on SIGTERM is ablate's (tests/test_claims.py); this is the CLI's wiring
def test_sigterm_releases_the_runs_claim(tiny_recipe: Path, tmp_path: Path) -> None:
    run = run_path(tmp_path)
    log = tmp_path / "terminated.log"
    process = start(command(tiny_recipe), launch_env(tmp_path), log)
    try:
        wait_for(lambda: list(run.glob("checkpoints/step_*/COMPLETE")), process, log)
        assert read_claim(claim_path(run)).pid == process.pid
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        wait_bounded([process])
    assert process.returncode == -signal.SIGTERM, log.read_text()[-3000:]
    assert not list(run.glob("CLAIM*"))


@pytest.mark.slow
def test_a_held_run_ends_every_process_of_a_launch_with_the_same_line(tiny_recipe: Path, tmp_path: Path) -> None:
    """``accelerate launch ... -m sandbox run``: the main process claims, the other learns the outcome."""
    from launching import accelerate_command, free_port

    run = run_path(tmp_path)
    run.mkdir(parents=True)
    now = round(time.time(), 3)
    holder = replace(Claim.new(600), host="node7", pid=4242, job="81234", claimed_at=now, refreshed_at=now)
    replace_file(claim_path(run), holder.encode())
    log = tmp_path / "launch.log"
    launch = accelerate_command("--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                                "-m", "sandbox", "run", str(tiny_recipe), *LONG, "--overwrite")
    process = start(launch, launch_env(tmp_path), log)
    wait_bounded([process])
    text = log.read_text()
    assert process.returncode != 0, text[-3000:]
    errors = error_lines(text)
    assert len(errors) == 2 and len(set(errors)) == 1, text[-3000:]
    assert "is being trained by node7:4242 (job 81234), refreshed " in errors[0]
    assert sorted(p.name for p in run.iterdir()) == ["CLAIM"] and read_claim(claim_path(run)) == holder
