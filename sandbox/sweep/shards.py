"""``--shard K/N``: which runs of a sweep one of N jobs trains.

The runs of a sweep have a fixed order: the grid's combinations in the order ``--grid`` expands
them (component ``name`` keys first, then each axis's values as given), each with every seed of
``--seeds`` in the order given. Run number ``i`` (from 0) of that order belongs to shard ``i mod N``.
The rule depends on nothing but the grid, the seeds and N (no hashing, no machine state), so every
job computes the same split; the N shards are disjoint, together hold every run once, and differ
in size by at most one run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, TypeVar

from sandbox.errors import SandboxError

Item = TypeVar("Item")

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``0/1``: the whole sweep)."""

    index: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, position: int) -> bool:
        """Whether run number ``position`` of the sweep belongs to this shard."""
        return shard_of(position, self.count) == self.index

    def share(self, items: Sequence[Item]) -> list[tuple[int, Item]]:
        """This shard's items with their positions in the sweep."""
        return [(position, item) for position, item in enumerate(items) if self.owns(position)]


def shard_of(position: int, count: int) -> int:
    """The shard (of ``count``) that run number ``position`` of the sweep belongs to."""
    return position % count


def parse_shard(text: str) -> Shard:
    """``"3/8"`` -> ``Shard(3, 8)``; a one-line error unless 0 <= K < N."""
    match = _SHARD.fullmatch(text)
    if match is None:
        raise SandboxError(f"--shard {text}: expected K/N, e.g. --shard 0/8 for the first of 8 jobs")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise SandboxError(f"--shard {text}: N must be at least 1")
    if index >= count:
        raise SandboxError(f"--shard {text}: K must be between 0 and N-1 (0..{count - 1})")
    return Shard(index, count)
