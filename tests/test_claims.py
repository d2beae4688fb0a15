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
from typing import Callable

import pytest

from sandbox.rundir import claims
from sandbox.rundir.claims import (
    Attempt,
    Claim,
    ClaimKeeper,
    acquire,
    claim_path,
    heartbeat_path,
    read_claim,
    replace_file,
)


def backdate(path: Path, seconds: float) -> None:
    """Set ``path``'s modification time ``seconds`` before now (the file server's clock, here this machine's)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def stale_claim(path: Path, silent_s: float = 100.0, timeout_s: float = 10.0) -> Claim:
    """Write a claim of another machine's process into ``path`` whose heartbeat (and the claim itself) was last
    touched ``silent_s`` ago; return it as read back."""
    claim = replace(Claim.new(timeout_s), host="deadhost", pid=1, claimed_at=round(time.time(), 3) - 2 * silent_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, claim.encode())
    beat = heartbeat_path(path, claim.token)
    beat.write_bytes(b"")
    backdate(path, 2 * silent_s)
    backdate(beat, silent_s)
    return read_claim(path)


def leftovers(folder: Path) -> list[str]:
    """Claim files other than ``CLAIM`` itself and its holder's heartbeat (temporary, takeover, clock
    files, another holder's heartbeat)."""
    current = read_claim(claim_path(folder))
    kept = set() if current is None else {heartbeat_path(claim_path(folder), current.token).name}
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("CLAIM.") and p.name not in kept)


def test_a_claim_is_created_once_and_released(tmp_path: Path) -> None:
    path = claim_path(tmp_path / "run")
    first, second = Claim.new(600), Claim.new(600, shard="1/2")
    assert acquire(path, first) == Attempt(True, None)
    assert read_claim(path) == first
    attempt = acquire(path, second)
    assert not attempt.won and attempt.other == first
    assert "refreshed 0 s ago" in attempt.other.describe()
    assert heartbeat_path(path, first.token).is_file() and not heartbeat_path(path, second.token).exists()
    keeper = ClaimKeeper(path, first)
    keeper.release()
    assert not path.exists() and leftovers(path.parent) == [] and not list(path.parent.glob("CLAIM*"))
    assert acquire(path, second).won and read_claim(path).shard == "1/2"


def test_the_claim_file_names_its_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "81234")
    claim = Claim.new(600, shard="3/8")
    path = claim_path(tmp_path)
    assert acquire(path, claim).won
    text = path.read_text()
    for field in ('"host"', f'"pid": {os.getpid()}', '"job": "81234"', '"shard": "3/8"', '"claimed_at"',
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
    backdate(lock, 601)  # that taker died long ago
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
    content = path.read_bytes()
    first = read_claim(path).refreshed_at
    with pytest.raises(RuntimeError), ClaimKeeper(path, mine):
        deadline = time.monotonic() + 10
        while read_claim(path).refreshed_at == first and time.monotonic() < deadline:
            time.sleep(0.02)
        refreshed = read_claim(path)
        assert refreshed.token == mine.token and refreshed.refreshed_at > first
        assert path.read_bytes() == content, "a refresh touches the heartbeat, never CLAIM"
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
from sandbox.rundir.claims import Claim, ClaimKeeper, acquire, released_on_sigterm

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
    from sandbox.rundir.directory import RunDirectory

    recipe = load_recipe(tiny_recipe)
    run_dir = RunDirectory.for_recipe(recipe)
    mine = Claim.new(600)
    assert acquire(claim_path(run_dir.path), mine).won
    run_dir.prepare(recipe, resume=False, overwrite=False)  # only a claim: nothing to overwrite
    (run_dir.checkpoints / "step_00000002").mkdir(parents=True)
    (run_dir.path / "junk.txt").write_text("x")
    run_dir.prepare(recipe, resume=False, overwrite=True)
    assert sorted(p.name for p in run_dir.path.iterdir()) == ["CLAIM", f"CLAIM.alive.{mine.token}", "recipe.toml"]
    assert read_claim(claim_path(run_dir.path)) == mine


# -- fencing: a late refresh never undoes a takeover; a holder that lost its claim stops ------------


def slowed_refresh(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> threading.Event:
    """Make the refresh of the thread named ``refresher`` pause ``delay_s`` right after it has seen its
    token in ``CLAIM`` (before it writes); the event is set when it has seen it."""
    import sandbox.rundir.claims as claims

    seen = threading.Event()
    real = claims.read_claim

    def read(path: Path, heartbeat: bool = True) -> Claim | None:
        claim = real(path, heartbeat)
        if threading.current_thread().name == "refresher" and path.name == "CLAIM":
            seen.set()
            time.sleep(delay_s)
        return claim

    monkeypatch.setattr(claims, "read_claim", read)
    return seen


def test_a_refresh_delayed_past_a_takeover_attempt_never_restores_the_old_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live but slow holder: its claim went stale, a taker comes while its refresh is under way."""
    path = claim_path(tmp_path)
    old = stale_claim(path, silent_s=5.0, timeout_s=4.0)  # stale to the taker; the refresh began in time
    keeper = ClaimKeeper(path, old)
    seen = slowed_refresh(monkeypatch, delay_s=0.5)
    outcome: list[bool] = []
    refresher = threading.Thread(target=lambda: outcome.append(keeper.refresh()), name="refresher")
    refresher.start()
    assert seen.wait(10)
    taker = Claim.new(600)
    attempt = acquire(path, taker)  # while the refresh sleeps between its check and its write
    refresher.join()
    current = read_claim(path)
    if attempt.won:  # never both: the taker's claim must stay, and the holder must know it lost
        assert current.token == taker.token and outcome == [False] and keeper.lost
    else:
        assert outcome == [True] and current.token == old.token and not keeper.lost
    assert attempt.won + outcome[0] == 1
    assert leftovers(tmp_path) == []


class Clock:
    """The ``time`` module as :mod:`sandbox.rundir.claims` sees it, with a wall clock and a monotonic clock
    that a test moves forward at once (a stall of ten minutes without sleeping)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def time(self) -> float:
        return time.time() + self.ahead

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    moved = Clock()
    monkeypatch.setattr(claims, "time", moved)
    return moved


def after_the_first_read(monkeypatch: pytest.MonkeyPatch, action: Callable[[], object]) -> None:
    """Run ``action`` once, right after the next read of a ``CLAIM`` file and before the reader goes on."""
    real, pending = claims.read_claim, [action]

    def read(path: Path, heartbeat: bool = True) -> Claim | None:
        claim = real(path, heartbeat)
        if path.name == "CLAIM" and pending:
            pending.pop()()
        return claim

    monkeypatch.setattr(claims, "read_claim", read)


@pytest.mark.parametrize("taken_over", [True, False], ids=["taken-over", "refreshed"])
def test_a_taker_that_read_a_stale_claim_checks_it_again_under_its_takeover_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken_over: bool
) -> None:
    """A late taker: it read the stale claim, then (before it took the takeover file) another taker
    completed a takeover, or the slow holder refreshed its claim. It must find that out under the
    takeover file (which the first taker removed, or the refresh released) and lose."""
    path = claim_path(tmp_path)
    old = stale_claim(path, silent_s=5.0, timeout_s=4.0)
    keeper = ClaimKeeper(path, old)
    early = Claim.new(600, shard="1/2")
    done: list[object] = []
    after_the_first_read(monkeypatch, lambda: done.append(acquire(path, early) if taken_over else keeper.refresh()))
    late = Claim.new(600)
    attempt = acquire(path, late)  # its first read of CLAIM sees the stale claim; the other acts right after
    assert done == ([Attempt(True, old)] if taken_over else [True])
    expected = early if taken_over else keeper.mine
    assert not attempt.won and attempt.other == expected, "never both: the late taker loses"
    assert read_claim(path) == expected
    assert leftovers(tmp_path) == []
    if not taken_over:
        keeper.check()  # the holder goes on


def test_a_release_that_finds_its_claim_taken_over_under_its_takeover_file_leaves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder releases a claim it was deemed dead for: a taker completes its takeover between the
    release's first look at ``CLAIM`` and its takeover file. The taker's claim stays."""
    path = claim_path(tmp_path)
    old = stale_claim(path, silent_s=5.0, timeout_s=4.0)
    taker = Claim.new(600, shard="1/2")
    done: list[Attempt] = []
    after_the_first_read(monkeypatch, lambda: done.append(acquire(path, taker)))
    claims.release(path, old)  # it still sees its own token first
    assert done == [Attempt(True, old)]
    assert read_claim(path) == taker
    assert leftovers(tmp_path) == []


def stall_the_refresh(monkeypatch: pytest.MonkeyPatch, where: str) -> tuple[threading.Event, threading.Event]:
    """Make the refresh of the thread named ``refresher`` stall until the second event is set; the first is
    set when it stalls. ``where``: ``"read"``, right after it has read its token in ``CLAIM`` (before its
    stall check); ``"write"``, inside its write (before the write reaches the file server: today the
    heartbeat's ``utime``; before issue 35, the rewrite of ``CLAIM``, which the old hook below stalled)."""
    stalled, resume = threading.Event(), threading.Event()

    def stall() -> None:
        if threading.current_thread().name == "refresher":
            stalled.set()
            assert resume.wait(10), "the test never resumed the refresh"

    if where == "read":
        real_read = claims.read_claim

        def read(path: Path, heartbeat: bool = True) -> Claim | None:
            claim = real_read(path, heartbeat)
            if path.name == "CLAIM":
                stall()
            return claim

        monkeypatch.setattr(claims, "read_claim", read)
    else:
        real_beat = claims.beat

        def beat(path: Path, mine: Claim) -> None:
            stall()
            real_beat(path, mine)

        monkeypatch.setattr(claims, "beat", beat)
    return stalled, resume


def refresh_stalled_while(
    keeper: ClaimKeeper, stalled: threading.Event, resume: threading.Event, meanwhile: Callable[[], None]
) -> list[bool]:
    """Run ``keeper.refresh()`` in the thread ``refresher``; once it stalls, run ``meanwhile`` and let it go on."""
    outcome: list[bool] = []
    refresher = threading.Thread(target=lambda: outcome.append(keeper.refresh()), name="refresher")
    refresher.start()
    try:
        deadline = time.monotonic() + 10
        while not stalled.wait(0.01) and refresher.is_alive() and time.monotonic() < deadline:
            pass
        assert stalled.is_set(), "the refresh never stalled"
        meanwhile()
    finally:
        resume.set()
        refresher.join(10)
    assert not refresher.is_alive()
    return outcome


def stalled_refresh_and_takeover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock, where: str, stall: float
) -> tuple[ClaimKeeper, Claim, Claim, Attempt, list]:
    """A holder's refresh stalled at ``where`` (:func:`stall_the_refresh`) for ``stall`` timeouts while a
    taker tries its takeover: ``(keeper, holder's claim, taker's claim, taker's attempt, refresh outcome)``."""
    path = claim_path(tmp_path)
    mine = Claim.new(600)
    assert acquire(path, mine).won
    keeper = ClaimKeeper(path, mine)
    stalled, resume = stall_the_refresh(monkeypatch, where)
    attempts: list[tuple[Claim, Attempt]] = []

    def meanwhile() -> None:
        clock.ahead = stall * mine.timeout_s  # the holder's clocks
        backdate(heartbeat_path(path, mine.token), stall * mine.timeout_s)  # the file server's
        taker = Claim.new(600, shard="1/2")
        attempts.append((taker, acquire(path, taker)))

    outcome = refresh_stalled_while(keeper, stalled, resume, meanwhile)
    [(taker, attempt)] = attempts
    return keeper, mine, taker, attempt, outcome


@pytest.mark.parametrize("stall", [0.6, 1.1], ids=["half-timeout", "whole-timeout"])
def test_a_refresh_stalled_after_its_check_of_the_claim_gives_up_instead_of_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock, stall: float
) -> None:
    """The refresh has seen its token in ``CLAIM`` under its takeover file, then stalls (suspended, the
    filesystem hangs) for ``stall`` timeouts. Past half its timeout it gives up without writing; past
    the whole timeout a taker has taken the claim over meanwhile (the refresher's takeover file went
    stale), and a write would overwrite the taker's claim."""
    from sandbox.errors import SandboxError

    keeper, mine, taker, attempt, outcome = stalled_refresh_and_takeover(tmp_path, monkeypatch, clock, "read", stall)
    path = claim_path(tmp_path)
    assert outcome == [False], "a stalled refresh does not write"
    if stall < 1:  # nobody may take the claim yet: it stays as it was, and the holder stops all the same
        assert not attempt.won and attempt.other == mine and read_claim(path) == mine
        with pytest.raises(SandboxError, match="could not be refreshed for 6 min"):
            keeper.check()
    else:
        assert attempt.won and read_claim(path) == taker, "the taker's claim stays"
        with pytest.raises(SandboxError, match=r"was taken over \(now held by .* \(shard 1/2\)\)"):
            keeper.check()
    assert leftovers(tmp_path) == []


def test_a_refresh_stalled_inside_its_write_past_the_timeout_never_undoes_a_takeover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    """The refresh is writing when it stalls for longer than the timeout; a taker takes the claim over
    meanwhile, as it may: the holder was silent for longer than its timeout. The late write must not
    bring the old claim back, and the holder must stop. Before issue 35 every refresh rewrote ``CLAIM``
    (temporary file, ``fsync``, ``rename``): stalled inside that write, it put the old claim back over
    the taker's (this test failed: ``CLAIM`` held the holder's token). Now it touches its heartbeat only."""
    from sandbox.errors import SandboxError

    keeper, _, taker, attempt, _ = stalled_refresh_and_takeover(tmp_path, monkeypatch, clock, "write", 1.1)
    path = claim_path(tmp_path)
    assert attempt.won, "a holder silent for longer than its timeout is taken over"
    assert read_claim(path) == taker, "the late write left the taker's claim"
    assert not heartbeat_path(path, keeper.mine.token).exists(), "the late touch did not bring the heartbeat back"
    with pytest.raises(SandboxError, match="was taken over"):
        keeper.check()
    keeper.release()
    assert read_claim(path) == taker and leftovers(tmp_path) == []


@pytest.mark.parametrize("skew", [-1.5, 1.5], ids=["holder-behind", "holder-ahead"])
def test_skewed_clocks_neither_take_over_a_live_claim_nor_keep_a_dead_one(
    tmp_path: Path, clock: Clock, skew: float
) -> None:
    """Hosts whose wall clocks disagree by ``skew`` timeouts (simulated): one clock, the file server's,
    decides. A live holder is not taken over, and once it dies it is taken over after its timeout,
    whichever host's clock is off. Before issue 35 the holder wrote its own clock into ``CLAIM`` and the
    taker compared it with its own: a holder behind was taken over alive, one ahead kept its claim after
    death until the taker's clock caught up (this test failed in both)."""
    from sandbox.errors import SandboxError

    path = claim_path(tmp_path)
    timeout_s = 60.0
    clock.ahead = skew * timeout_s  # on the holder's host
    mine = Claim.new(timeout_s)
    assert acquire(path, mine).won
    keeper = ClaimKeeper(path, mine)
    assert keeper.refresh()
    clock.ahead = 0.0  # on the taker's host
    taker = Claim.new(timeout_s, shard="1/2")
    attempt = acquire(path, taker)
    assert not attempt.won and attempt.other == mine, "a live holder keeps its claim"
    assert attempt.other.describe().endswith("refreshed 0 s ago")
    clock.ahead = skew * timeout_s  # the holder goes on
    keeper.check()
    backdate(heartbeat_path(path, mine.token), timeout_s + 1)  # the holder died a timeout ago
    clock.ahead = -skew * timeout_s  # and the next taker's clock is off the other way
    assert acquire(path, taker).won
    with pytest.raises(SandboxError, match=r"was taken over \(now held by .* \(shard 1/2\)\)"):
        keeper.check()
    assert leftovers(tmp_path) == []


def test_a_refresh_after_a_takeover_finds_it_and_the_guard_stops_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from sandbox.errors import SandboxError

    path = claim_path(tmp_path)
    old = stale_claim(path, silent_s=5.0, timeout_s=4.0)
    keeper = ClaimKeeper(path, old)
    taker = replace(Claim.new(600, shard="1/2"), host="node7", pid=4242)
    assert acquire(path, taker).won
    assert not keeper.refresh() and keeper.lost
    assert read_claim(path).token == taker.token, "the late refresh left the taker's claim"
    with pytest.raises(SandboxError, match=r"was taken over \(now held by node7:4242 \(shard 1/2\)\): this process stops"):
        keeper.check()
    keeper.release()
    assert read_claim(path).token == taker.token


def test_the_guard_stops_a_holder_whose_claim_was_replaced_before_its_next_refresh(tmp_path: Path) -> None:
    from sandbox.errors import SandboxError

    path = claim_path(tmp_path)
    mine = Claim.new(600)
    assert acquire(path, mine).won
    with ClaimKeeper(path, mine) as keeper:
        keeper.check()  # held: writing goes on
        replace_file(path, replace(Claim.new(600), host="node7", pid=4242).encode())
        with pytest.raises(SandboxError, match="now held by node7:4242"):
            keeper.check()
        assert keeper.lost


def test_refresh_errors_are_reported_once_and_stop_the_holder_after_half_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sandbox.rundir.claims as claims
    from sandbox.errors import SandboxError

    path = claim_path(tmp_path)
    mine = Claim.new(0.6)  # refreshed every 0.06 s; the guard stops after 0.3 s without one
    assert acquire(path, mine).won

    def broken(target: Path, claim: Claim) -> None:
        raise OSError(5, "Input/output error", str(heartbeat_path(target, claim.token)))

    monkeypatch.setattr(claims, "beat", broken)
    with ClaimKeeper(path, mine) as keeper:
        keeper.check()
        began = time.monotonic()
        while keeper.problem is None and time.monotonic() < began + 30:  # a refresh has failed
            time.sleep(0.01)
        time.sleep(max(0.0, began + 0.45 - time.monotonic()))
        with pytest.raises(SandboxError, match=r"could not be refreshed for \d+ s \(Input/output error \(.*CLAIM\.alive\.\w+\)\), half its 0.6 s"):
            keeper.check()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: the claim {path} could not be refreshed: Input/output error")


def dead_pid() -> int:
    """The pid of a process of this machine that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_claim_of_a_dead_process_of_this_machine_is_stale_at_once(tmp_path: Path) -> None:
    path = claim_path(tmp_path)
    dead = replace(Claim.new(600), pid=dead_pid())
    assert dead.holder_is_gone() and dead.is_stale() and not dead.silent_for() > 1
    replace_file(path, dead.encode())
    mine = Claim.new(600)
    assert acquire(path, mine) == Attempt(True, dead)
    assert not mine.holder_is_gone() and not mine.is_stale()
    elsewhere = replace(dead, host="node7")  # another machine's pids say nothing here
    assert not elsewhere.holder_is_gone() and not elsewhere.is_stale()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times come from /proc")
def test_a_reused_pid_does_not_keep_a_dead_holders_claim_alive(tmp_path: Path) -> None:
    mine = Claim.new(600)
    assert mine.process is not None and not mine.holder_is_gone()
    machine, _, start = mine.process.rpartition("/")
    reused = replace(mine, process=f"{machine}/{int(start) - 1}")  # this pid, but an earlier process's
    assert reused.holder_is_gone() and reused.is_stale()
    other_namespace = replace(mine, pid=dead_pid(), process=f"another-boot/pid:[1]/{start}")
    assert not other_namespace.holder_is_gone(), "a container with this host name has pids of its own"


def test_without_proc_only_the_host_name_and_a_dead_pid_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``/proc`` (not Linux): no boot id, namespace or start time; a dead pid of this host name is
    still stale at once, a live one is kept (a reused pid looks alive: the claim waits, the safe side)."""
    recorded = Claim.new(600)  # made where /proc exists: it names its process
    monkeypatch.setattr(claims, "_machine", lambda: None)
    monkeypatch.setattr(claims, "_start_ticks", lambda pid: None)
    mine = Claim.new(600)
    assert mine.process is None and not mine.holder_is_gone() and not mine.is_stale()
    dead = replace(mine, pid=dead_pid())
    assert dead.holder_is_gone() and dead.is_stale()
    assert dead.staleness().endswith(", its process is gone")
    assert not replace(recorded, process=f"{recorded.process}0").holder_is_gone(), "a live pid is kept, start unknown"
    assert replace(recorded, pid=dead.pid).holder_is_gone()
    assert not replace(dead, host="node7").holder_is_gone()
