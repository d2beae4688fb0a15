"""A fake installed distribution with one ``sandbox`` entry point: discovery tests install nothing."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from sandbox.plugins import ENTRY_POINT_GROUP


class FakeDistribution(importlib.metadata.Distribution):
    """Distribution ``name`` ``version`` whose ``sandbox`` entry point ``entry`` names ``module``."""

    def __init__(self, module: str, name: str = "shake-plugin", version: str = "1.2.3", entry: str = "shake") -> None:
        self.module, self.name_, self.version_, self.entry = module, name, version, entry

    def read_text(self, filename: str) -> str | None:
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: {self.name_}\nVersion: {self.version_}\n"
        if filename == "entry_points.txt":
            return f"[{ENTRY_POINT_GROUP}]\n{self.entry} = {self.module}\n"
        return None

    def locate_file(self, path: str) -> Path:
        return Path(path)
