"""Sweeps spread over several jobs: ``--shard K/N``, claims on a shared folder, ``--list``, stale claims.

The concurrent and killed jobs are real ``python -m sandbox ablate`` processes on one folder,
training a grid of tiny runs; the others run the command in this process. Two concurrent shards
and a job of two processes are ``slow`` (``-m slow``); two identical concurrent sweeps (the runs
they contend for) and the kill -9 are in the default run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from run_records import assert_same_run, records
from sandbox.cli import main
from sandbox.errors import SandboxError
from sandbox.rundir.claims import Claim, claim_path, read_claim, replace_file
from sandbox.rundir.decisions import claim_run, failure_stamp
from sandbox.sweep.shards import Shard, parse_shard, shard_of
from sandbox.rundir.directory import RunDirectory
from launching import LAUNCH_TIMEOUT_S, accelerate_command, free_port, launch_env, start, wait_bounded

SHORT = ["--set", "train.iters=2", "--set", "train.warmup_iters=2", "--set", "train.threads=1"]
GRID = ["--grid", "perturbation.name=none,dropout", "--seeds", "0,1"]
RUNS = [("perturbation.name=none", 0), ("perturbation.name=none", 1),
        ("perturbation.name=dropout", 0), ("perturbation.name=dropout", 1)]
"""The runs of ``GRID`` in the sweep's order: run i belongs to shard i mod N."""


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def fake_claim(run_path: Path, silent_s: float, timeout_s: float = 600.0) -> Claim:
    """A claim by another machine's process, last refreshed ``silent_s`` ago (without a heartbeat file, the
    claim file's modification time counts)."""
    now = round(time.time(), 3)
    claim = replace(Claim.new(timeout_s, "0/1"), host="elsewhere", pid=77, claimed_at=now - silent_s)
    run_path.mkdir(parents=True, exist_ok=True)
    replace_file(claim_path(run_path), claim.encode())
    os.utime(claim_path(run_path), (now - silent_s, now - silent_s))
    return read_claim(claim_path(run_path))


def claim_files(folder: Path) -> list[Path]:
    """Every claim file (``CLAIM``, takeover or temporary files) below ``folder``."""
    return sorted(folder.rglob("CLAIM*"))


# -- the split ------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 13])
def test_the_shards_hold_every_run_exactly_once(count: int) -> None:
    for runs in (0, 1, 4, 7, 24, 101):
        jobs = [f"run{i}" for i in range(runs)]
        shares = [Shard(index, count).share(jobs) for index in range(count)]
        positions = sorted(position for share in shares for position, _ in share)
        assert positions == list(range(runs)), "every run once"
        assert all(jobs[position] == job for share in shares for position, job in share)
        sizes = [len(share) for share in shares]
        assert max(sizes) - min(sizes) <= 1, "balanced"
    assert [shard_of(position, 3) for position in range(7)] == [0, 1, 2, 0, 1, 2, 0], "run i is shard i mod N"


def test_shard_values_are_checked() -> None:
    assert parse_shard("3/8") == Shard(3, 8) and str(parse_shard(" 0 / 1 ")) == "0/1"
    for text, problem in [("9/8", "K must be between 0 and N-1 (0..7)"), ("1/0", "N must be at least 1"),
                          ("8/8", "K must be between 0 and N-1"), ("-1/8", "expected K/N"), ("3", "expected K/N")]:
        with pytest.raises(SandboxError, match=problem.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            parse_shard(text)


def test_a_bad_shard_is_one_line_with_exit_2(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["ablate", str(tiny_recipe), "--shard", "9/8"], capsys)
    assert code == 2 and err == "error: --shard 9/8: K must be between 0 and N-1 (0..7)\n"
    code, _, err = run_cli(["ablate", str(tiny_recipe), "--claim-timeout", "0"], capsys)
    assert code == 2 and err.startswith("error: --claim-timeout 0:") and err.count("\n") == 1


# -- in this process ------------------------------------------------------------------------------


def test_list_shows_every_run_with_its_state_and_trains_nothing(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    folder = tmp_path / "sweep" / "tiny"
    done, running, stale, failed, partial = (folder / label / f"seed{seed}" for label, seed in
                                             [*RUNS, ("perturbation.name=none", 2)][:5])
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"best_miou": 0.4321}))
    fake_claim(running, silent_s=3)
    (running / "recipe.toml").write_text("[train]\niters = 8\n")
    (running / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    fake_claim(stale, silent_s=700)
    failed.mkdir(parents=True)
    (failed / "FAILED").write_text("[dataset] 'shapes' has no unlabeled images\n")
    (partial / "checkpoints" / "step_00000004").mkdir(parents=True)
    (partial / "checkpoints" / "step_00000004" / "COMPLETE").write_text("4")
    (partial / "recipe.toml").write_text("[train]\niters = 8\n")
    (partial / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n{"step": 6, "loss": 1.0}\n')
    before = sorted(path for path in tmp_path.rglob("*"))

    args = ["ablate", str(tiny_recipe), "--grid", "perturbation.name=none,dropout", "--seeds", "0,1,2",
            "--output", str(tmp_path / "sweep"), "--list", "--shard", "1/4"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    rows = {line.split("│")[2].strip() + " " + line.split("│")[3].strip(): line
            for line in out.splitlines() if line.startswith("│")}
    assert len(rows) == 6
    assert "done" in rows["perturbation.name=none 0"] and "best mIoU 43.21" in rows["perturbation.name=none 0"]
    assert "│ running" in rows["perturbation.name=none 1"]
    assert "elsewhere:77 (shard 0/1), refreshed " in rows["perturbation.name=none 1"]
    assert " s ago; last logged step 2 of 8, no complete checkpoint" in rows["perturbation.name=none 1"]
    assert "│ stale claim" in rows["perturbation.name=dropout 0"]
    assert "elsewhere:77 (shard 0/1) silent for 12 min (timeout 10 min): the next job takes it over; not started" in out
    assert "│ failed" in rows["perturbation.name=dropout 1"] and "[dataset] 'shapes'" in rows["perturbation.name=dropout 1"]
    assert "│ partial" in rows["perturbation.name=none 2"]
    assert "last logged step 6 of 8, resumes from step_00000004" in rows["perturbation.name=none 2"]
    assert "│ to do" in rows["perturbation.name=dropout 2"]
    assert [rows[f"{label} {seed}"].split("│")[4].strip() for label, seed in
            [("perturbation.name=none", 0), ("perturbation.name=none", 1), ("perturbation.name=none", 2),
             ("perturbation.name=dropout", 0)]] == ["0/4", "1/4", "2/4", "3/4"]
    assert "6 runs: 1 done, 1 running, 1 stale claim, 1 failed, 1 partial, 1 to do" in out
    assert sorted(path for path in tmp_path.rglob("*")) == before, "--list changes nothing"


def test_shards_train_their_share_and_a_finished_shard_has_nothing_left_to_do(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out_dir = tmp_path / "sweep"
    args = ["ablate", str(tiny_recipe), *GRID, *SHORT, "--output", str(out_dir)]
    code, out, err = run_cli([*args, "--shard", "0/2"], capsys)
    assert code == 0, err
    assert "shard 0/2: 2 of these runs" in err
    assert "[1/2] perturbation.name=none seed0: training" in err and "[2/2] perturbation.name=dropout seed0: training" in err
    assert "seed1" not in err
    assert f"2 of 4 runs of the sweep are finished (--list shows every run); once all are: sandbox compare {out_dir / 'tiny'}" in err
    assert out == "", "no compare table before every shard is done"

    code, out, err = run_cli([*args, "--shard", "1/2"], capsys)
    assert code == 0 and "perturbation.name=none seed1: training" in err and "seed0" not in err
    assert "4 finished runs" in out, "the last shard prints the compare table"

    code, out, err = run_cli([*args, "--shard", "0/2"], capsys)
    assert code == 0 and "shard 0/2: nothing left to do (2 finished, 0 being trained by other processes)" in err
    code, out, err = run_cli([*args, "--shard", "7/8"], capsys)
    assert code == 0 and "shard 7/8: nothing left to do (0 finished, 0 being trained by other processes)" in err
    for label, seed in RUNS:
        assert [r["step"] for r in records(out_dir / "tiny" / label / f"seed{seed}")] == [2, 2]
    assert claim_files(out_dir) == []


def test_a_run_held_by_a_live_process_is_left_to_it_and_a_stale_claim_is_taken_over(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out_dir = tmp_path / "sweep"
    held = out_dir / "tiny" / "perturbation.name=none" / "seed3"
    claim = fake_claim(held, silent_s=1)
    args = ["ablate", str(tiny_recipe), "--grid", "perturbation.name=none,dropout", *SHORT, "--output", str(out_dir)]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "[1/2] perturbation.name=none seed3: being trained by elsewhere:77 (shard 0/1), refreshed " in err
    assert " s ago, skipped" in err
    assert "perturbation.name=dropout seed3: done" in err
    assert "1 run was being trained by another process: left to it" in err
    assert "1 finished runs" in out, "the compare table of the folder"
    assert read_claim(claim_path(held)) == claim and sorted(p.name for p in held.iterdir()) == ["CLAIM"]

    fake_claim(held, silent_s=601)  # its holder died ten minutes ago
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert ("[1/2] perturbation.name=none seed3: training (took over the stale claim of elsewhere:77 (shard 0/1), "
            "silent for 10 min (timeout 10 min))") in err
    assert "perturbation.name=dropout seed3: finished already, skipped" in err
    assert (held / "summary.json").is_file() and claim_files(out_dir) == []


def test_a_run_that_failed_in_another_job_during_the_sweep_is_not_retried(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.path.mkdir()
    (run_dir.path / "FAILED").write_text("boom\n")
    stamp = failure_stamp(run_dir.path)
    decision, keeper = claim_run(run_dir, 600, None, failed_before=stamp)  # failed before this job started: retried
    assert decision.action == "start" and keeper is not None and claim_path(run_dir.path).is_file()
    keeper.release()
    decision, keeper = claim_run(run_dir, 600, None, failed_before=None)  # failed since: left alone
    assert decision.action == "failed elsewhere" and decision.note == "boom" and keeper is None
    assert claim_files(tmp_path) == []


# -- concurrent processes on one folder -----------------------------------------------------------


def concurrent_sweeps(tiny_recipe: Path, tmp_path: Path, jobs: list[list[str]]) -> list[str]:
    """Start one ``sandbox ablate`` process per entry of ``jobs`` (its extra arguments) at once on
    one folder; all must exit 0. Their logs."""
    command = [sys.executable, "-m", "sandbox", "ablate", str(tiny_recipe), *GRID, *SHORT, "--output", str(tmp_path / "sweep")]
    processes, logs = [], []
    try:
        for index, extra in enumerate(jobs):
            logs.append(tmp_path / f"job{index}.log")
            processes.append(start([*command, *extra], launch_env(tmp_path), logs[-1]))
    finally:
        wait_bounded(processes)
    texts = [log.read_text() for log in logs]
    for process, text in zip(processes, texts):
        assert process.returncode == 0, text[-3000:]
    return texts


def assert_every_run_trained_once(folder: Path, logs: list[str]) -> None:
    """Every run of ``GRID`` finished, trained by exactly one process, its steps logged once; no claim left."""
    for label, seed in RUNS:
        run = folder / label / f"seed{seed}"
        assert json.loads((run / "summary.json").read_text())["iters"] == 2
        started = sum(text.count(f"{label} seed{seed}: training") + text.count(f"{label} seed{seed}: resuming")
                      for text in logs)
        assert started == 1, f"{label} seed{seed} trained {started} times"
        assert [r["step"] for r in records(run)] == [2, 2], "one training record and one evaluation"
    assert claim_files(folder) == []


@pytest.mark.slow  # disjoint shares: the in-process test above covers the split; this one, two real jobs
def test_two_concurrent_shards_train_every_run_once(tiny_recipe: Path, tmp_path: Path) -> None:
    logs = concurrent_sweeps(tiny_recipe, tmp_path, [["--shard", "0/2"], ["--shard", "1/2"]])
    assert_every_run_trained_once(tmp_path / "sweep" / "tiny", logs)
    for index, log in enumerate(logs):
        trained = {(label, seed) for label, seed in RUNS if f"{label} seed{seed}: training" in log}
        assert trained == {RUNS[position] for position in range(len(RUNS)) if position % 2 == index}


def test_two_identical_concurrent_sweeps_train_every_run_once(tiny_recipe: Path, tmp_path: Path) -> None:
    logs = concurrent_sweeps(tiny_recipe, tmp_path, [[], []])
    assert_every_run_trained_once(tmp_path / "sweep" / "tiny", logs)


def test_a_killed_shard_leaves_a_stale_claim_that_a_rerun_takes_over(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    grid = ["--grid", "perturbation.name=ddfp,none", "--shard", "0/2", "--claim-timeout", "2"]
    overrides = ["--set", "train.iters=8", "--set", "train.checkpoint_every=2", "--set", "train.threads=1"]
    args = ["ablate", str(tiny_recipe), *grid, *overrides]
    reference = tmp_path / "reference"
    assert run_cli([*args, "--output", str(reference)], capsys)[0] == 0

    sweep = tmp_path / "sweep"
    run_dir = sweep / "tiny" / "perturbation.name=ddfp" / "seed3"
    log = tmp_path / "killed.log"
    process = start([sys.executable, "-m", "sandbox", *args, "--output", str(sweep)], launch_env(tmp_path), log)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not list(run_dir.glob("checkpoints/step_*/COMPLETE")) and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.02)
        claim = read_claim(claim_path(run_dir))
        assert claim is not None and claim.pid == process.pid and claim.shard == "0/2" and claim.timeout_s == 2
        while read_claim(claim_path(run_dir)).refreshed_at == claim.refreshed_at and time.monotonic() < deadline:
            time.sleep(0.02)  # refreshed every 0.2 s while it trains
        time.sleep(random.uniform(0.0, 0.5))  # mid-step, mid-eval or mid-checkpoint
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        wait_bounded([process])
    assert process.returncode == -signal.SIGKILL, "the run finished before the kill: nothing was tested"
    assert not (run_dir / "summary.json").exists()
    left = read_claim(claim_path(run_dir))
    assert left is not None and left.token == claim.token and left.refreshed_at > claim.refreshed_at, "a stale claim stays"

    while not left.is_stale():
        time.sleep(0.1)
    code, out, err = run_cli([*args, "--output", str(sweep), "--list"], capsys)
    assert code == 0 and "stale claim" in out and "resumes from step_" in out
    assert f"{left.holder()} silent for " in out and ", its process is gone: the next job takes it over" in out
    code, _, err = run_cli([*args, "--output", str(sweep)], capsys)
    assert code == 0, err
    assert "perturbation.name=ddfp seed3: resuming from step_" in err
    assert f"(took over the stale claim of {left.holder()}, silent for" in err
    assert_same_run(reference / "tiny" / "perturbation.name=ddfp" / "seed3", run_dir)
    assert claim_files(sweep) == []
    assert not (sweep / "tiny" / "perturbation.name=none").exists(), "shard 1/2's run is not shard 0/2's"


@pytest.mark.slow
def test_a_job_of_two_processes_claims_once_and_its_processes_skip_and_train_in_step(
    tiny_recipe: Path, tmp_path: Path
) -> None:
    """``accelerate launch ... -m sandbox ablate --shard``: the main process claims, the other follows."""
    out_dir = tmp_path / "sweep"
    held = out_dir / "tiny" / "perturbation.name=none" / "seed3"
    claim = fake_claim(held, silent_s=1)
    log = tmp_path / "job.log"
    command = accelerate_command("--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                                 "-m", "sandbox", "ablate", str(tiny_recipe), "--grid", "perturbation.name=none,dropout",
                                 *SHORT, "--output", str(out_dir), "--shard", "0/1")
    process = start(command, launch_env(tmp_path), log)
    wait_bounded([process])
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    assert text.count("perturbation.name=none seed3: being trained by elsewhere:77") == 2, "both processes skip it"
    assert text.count("perturbation.name=dropout seed3: training") == 2, "both processes train the other"
    assert read_claim(claim_path(held)) == claim and sorted(p.name for p in held.iterdir()) == ["CLAIM"]
    trained = out_dir / "tiny" / "perturbation.name=dropout" / "seed3"
    assert json.loads((trained / "summary.json").read_text())["processes"] == 2
    assert claim_files(trained) == []
