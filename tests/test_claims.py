"""Claims on runs of a shared sweep folder: atomic creation, refresh, release, takeover of stale claims."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sandbox.analysis.claims import (
    Attempt,
    Claim,
    ClaimKeeper,
    acquire,
    claim_path,
    read_claim,
    replace_file,
)


def stale_claim(path: Path, silent_s: float = 100.0, timeout_s: float = 10.0) -> Claim:
    """Write a claim of a dead process (last refreshed ``silent_s`` ago) into ``path``; return it."""
    now = round(time.time(), 3)
    claim = replace(Claim.new(timeout_s), host="deadhost", pid=1, claimed_at=now - 2 * silent_s, refreshed_at=now - silent_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, claim.encode())
    return claim


def leftovers(folder: Path) -> list[str]:
    """Claim files other than ``CLAIM`` itself (temporary and takeover files)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("CLAIM."))


def test_a_claim_is_created_once_and_released(tmp_path: Path) -> None:
    path = claim_path(tmp_path / "run")
    first, second = Claim.new(600), Claim.new(600, shard="1/2")
    assert acquire(path, first) == Attempt(True, None)
    assert read_claim(path) == first
    attempt = acquire(path, second)
    assert not attempt.won and attempt.other == first
    assert "refreshed 0 s ago" in attempt.other.describe()
    keeper = ClaimKeeper(path, first)
    keeper.release()
    assert not path.exists() and leftovers(path.parent) == []
    assert acquire(path, second).won and read_claim(path).shard == "1/2"


def test_the_claim_file_names_its_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "81234")
    claim = Claim.new(600, shard="3/8")
    path = claim_path(tmp_path)
    assert acquire(path, claim).won
    text = path.read_text()
    for field in ('"host"', f'"pid": {os.getpid()}', '"job": "81234"', '"shard": "3/8"', '"claimed_at"', '"refreshed_at"',
                  '"timeout_s": 600.0'):
        assert field in text, field
    assert claim.holder().endswith(f":{os.getpid()} (job 81234, shard 3/8)")


@pytest.mark.parametrize("takers", [2, 8])
def test_concurrent_takers_of_a_stale_claim_never_both_win(tmp_path: Path, takers: int) -> None:
    for round_ in range(10):
        path = claim_path(tmp_path / f"run{round_}")
        stale = stale_claim(path)
        claims = [Claim.new(600) for _ in range(takers)]
        barrier = threading.Barrier(takers)
        results: list[Attempt] = [Attempt(False, None)] * takers

        def take(index: int) -> None:
            barrier.wait()
            results[index] = acquire(path, claims[index])

        threads = [threading.Thread(target=take, args=(index,)) for index in range(takers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [index for index, result in enumerate(results) if result.won]
        assert len(winners) == 1, results
        assert results[winners[0]].other == stale, "the winner took over the stale claim"
        assert read_claim(path).token == claims[winners[0]].token
        assert all(result.other.token == claims[winners[0]].token for result in results if not result.won)
        assert leftovers(path.parent) == []


def test_a_fresh_claim_is_kept_and_a_stale_one_taken_over(tmp_path: Path) -> None:
    path = claim_path(tmp_path)
    fresh = stale_claim(path, silent_s=5.0, timeout_s=10.0)
    attempt = acquire(path, Claim.new(600))
    assert not attempt.won and attempt.other == fresh and not fresh.is_stale()
    stale = stale_claim(path, silent_s=11.0, timeout_s=10.0)  # the holder's own timeout decides
    mine = Claim.new(1.0)
    assert acquire(path, mine) == Attempt(True, stale)
    assert read_claim(path) == mine


def test_a_taker_killed_mid_takeover_blocks_only_until_its_own_timeout(tmp_path: Path) -> None:
    path = claim_path(tmp_path)
    stale = stale_claim(path)
    lock = path.with_name(f"CLAIM.takeover.{stale.token}.0")
    replace_file(lock, Claim.new(600).encode())  # a taker that is still taking over
    assert not acquire(path, Claim.new(600)).won
    stale_claim(lock)  # that taker died long ago
    mine = Claim.new(600)
    assert acquire(path, mine).won and read_claim(path) == mine
    assert leftovers(path.parent) == []


def test_an_unreadable_claim_counts_as_held_until_it_is_old(tmp_path: Path) -> None:
    path = claim_path(tmp_path)
    path.write_text("{not json")
    held = acquire(path, Claim.new(600))
    assert not held.won and held.other.host == "unknown"
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert acquire(path, Claim.new(600)).won


def test_the_keeper_refreshes_the_claim_and_releases_it_on_an_exception(tmp_path: Path) -> None:
    path = claim_path(tmp_path)
    mine = Claim.new(0.5)  # refreshed every 0.05 s
    assert acquire(path, mine).won
    with pytest.raises(RuntimeError), ClaimKeeper(path, mine):
        deadline = time.monotonic() + 10
        while read_claim(path).refreshed_at == mine.refreshed_at and time.monotonic() < deadline:
            time.sleep(0.02)
        refreshed = read_claim(path)
        assert refreshed.token == mine.token and refreshed.refreshed_at > mine.refreshed_at
        assert refreshed.claimed_at == mine.claimed_at
        raise RuntimeError("the run failed")
    assert not path.exists() and leftovers(tmp_path) == []


def test_a_keeper_whose_claim_was_taken_over_warns_and_leaves_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = claim_path(tmp_path)
    mine = Claim.new(600)
    assert acquire(path, mine).won
    keeper = ClaimKeeper(path, mine)
    other = Claim.new(600, shard="1/2")
    replace_file(path, other.encode())  # this process was deemed dead and taken over
    assert not keeper.refresh() and keeper.lost
    keeper.release()
    assert read_claim(path) == other
    err = capsys.readouterr().err
    assert err.startswith("warning: the claim") and "was taken over (now held by" in err and "shard 1/2" in err


HOLDER = """
import sys, time
from pathlib import Path
from sandbox.analysis.claims import Claim, ClaimKeeper, acquire, released_on_sigterm

path = Path(sys.argv[1])
mine = Claim.new(600)
assert acquire(path, mine).won
with released_on_sigterm(), ClaimKeeper(path, mine):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_sigterm_releases_the_claims_then_ends_the_process_as_sigterm_does(tmp_path: Path) -> None:
    path = claim_path(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "holding\n"
        assert read_claim(path).pid == process.pid
        process.send_signal(signal.SIGTERM)  # scancel, a time limit
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert process.returncode == -signal.SIGTERM
    assert not path.exists() and leftovers(tmp_path) == []


def test_overwriting_a_run_directory_keeps_its_claim(tmp_path: Path, tiny_recipe: Path) -> None:
    from sandbox.recipe import load_recipe
    from sandbox.train.rundir import RunDirectory

    recipe = load_recipe(tiny_recipe)
    run_dir = RunDirectory.for_recipe(recipe)
    mine = Claim.new(600)
    assert acquire(claim_path(run_dir.path), mine).won
    run_dir.prepare(recipe, resume=False, overwrite=False)  # only a claim: nothing to overwrite
    (run_dir.checkpoints / "step_00000002").mkdir(parents=True)
    (run_dir.path / "junk.txt").write_text("x")
    run_dir.prepare(recipe, resume=False, overwrite=True)
    assert sorted(p.name for p in run_dir.path.iterdir()) == ["CLAIM", "recipe.toml"]
    assert read_claim(claim_path(run_dir.path)) == mine
