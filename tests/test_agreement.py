"""Every process learns every outcome (``sandbox.processes.agreement``), through the launch's store and
through its one fallback (no store reachable: one all-gather), on the 2 processes of the shared launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_launch import Job, SharedLaunch, process_group


def agree_both_ways(folder: Path) -> None:
    """Launch job: the same three agreements through the store and without it; what each process learnt."""
    import sandbox.processes.agreement as agreement
    from sandbox.errors import SandboxError
    from sandbox.processes.launch import process_state
    from sandbox.rundir.decisions import Decision

    process_group()
    state = process_state()
    rank = state.process_index
    learnt: dict[str, object] = {}
    store_channel = agreement.channel
    for path, channel in (("store", store_channel), ("fallback", lambda rank, world_size: None)):
        agreement.channel = channel
        try:
            learnt[f"{path} through"] = "store" if channel(rank, state.num_processes) is not None else "gather"
            with agreement.agreed(state) as outcome:
                outcome.value = [rank, f"from {rank}"]
            learnt[f"{path} values"] = outcome.values
            try:
                with agreement.agreed_errors(state):
                    if rank == 1:
                        raise SandboxError(f"{path}: the dataset is missing here")
                learnt[f"{path} error"] = None
            except SandboxError as error:
                learnt[f"{path} error"] = str(error)
            try:
                with agreement.agreed_errors(state):
                    raise SandboxError(f"{path}: rank {rank} failed too")
            except SandboxError as error:
                learnt[f"{path} both failed"] = str(error)
            decision, keeper = agreement.agree_on(state, lambda: (Decision("resume", f"{path} note"), None))
            learnt[f"{path} decision"] = [decision.action, decision.note, keeper is None]
            learnt[f"{path} main value"] = agreement.main_process_value(state, lambda: f"staging-{rank}")
        finally:
            agreement.channel = store_channel
    (folder / f"rank{rank}.json").write_text(json.dumps(learnt))


LAUNCH_JOBS = {"agreement": Job(agree_both_ways)}


@pytest.mark.parametrize("path", ["store", "fallback"])
def test_every_process_learns_every_outcome_with_or_without_the_store(shared_launch: SharedLaunch, path: str) -> None:
    folder = shared_launch.folder("agreement")
    learnt = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [entry[f"{path} through"] for entry in learnt] == [{"store": "store", "fallback": "gather"}[path]] * 2
    for entry in learnt:
        assert entry[f"{path} values"] == [[0, "from 0"], [1, "from 1"]]
        assert entry[f"{path} error"] == f"{path}: the dataset is missing here (on process 1)"
        assert entry[f"{path} both failed"] == f"{path}: rank 0 failed too", "the lowest-ranked failure wins"
        assert entry[f"{path} decision"][:2] == ["resume", f"{path} note"]
        assert entry[f"{path} main value"] == "staging-0"
    assert [entry[f"{path} decision"][2] for entry in learnt] == [True, True]
