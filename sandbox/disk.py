"""How much a folder holds on disk: the figures ``sandbox ablate --list`` and ``sandbox compare`` print.

Imports no torch (both commands read runs without it).
"""

from __future__ import annotations

import os
from pathlib import Path
from stat import S_ISREG


def folder_bytes(folder: Path) -> int:
    """The bytes of every regular file below ``folder`` (links not followed, each hard-linked file once;
    files that vanish while counting are skipped); 0 when ``folder`` does not exist."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if not S_ISREG(stat.st_mode) or (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_size
    return total


def human_bytes(size: int) -> str:
    """``512 B``, ``3.4 KB``, ``74.1 MB``, ``28.0 GB`` (powers of 1000, as ``du --si``)."""
    if size < 1000:
        return f"{size} B"
    value, units = size / 1000, ["KB", "MB", "GB", "TB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{value:.1f} {units[0]}"
