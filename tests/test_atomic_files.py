"""The one way files are written: whole or not at all, flushed, with the user's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from sandbox.rundir.atomic_files import TEMPORARY_MARK, remove_temporaries, write_atomically
from sandbox.rundir.files import is_claim_file
from sandbox.rundir.directory import RunDirectory


def test_a_new_file_has_the_users_umask_not_0600(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "summary.json", b"{}")
        RunDirectory(tmp_path).save_torch({"a": torch.ones(2)}, tmp_path / "best.pt")
    finally:
        os.umask(previous)
    for name in ("summary.json", "best.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert torch.load(tmp_path / "best.pt", weights_only=True)["a"].sum() == 2


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    write_atomically(path, b"old")

    def fails(handle: object) -> None:
        handle.write(b"half")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fails)
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def test_leftover_temporaries_are_removed_but_not_a_claims(tmp_path: Path) -> None:
    left = tmp_path / f".summary.json{TEMPORARY_MARK}abc"
    claim = tmp_path / f".CLAIM{TEMPORARY_MARK}def"
    for path in (left, claim, tmp_path / "metrics.jsonl"):
        path.write_bytes(b"x")
    assert remove_temporaries(tmp_path, keep=is_claim_file) == [left]
    assert claim.exists() and (tmp_path / "metrics.jsonl").exists()
