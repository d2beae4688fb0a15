"""Run sandbox commands in a fresh interpreter and check that they import no heavy library."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parent.parent
HEAVY = ("torch", "accelerate", "matplotlib")
"""Libraries a command that only reads folders must not import (seconds of start-up each)."""


def run_without_heavy_imports(commands: list[list[str]]) -> subprocess.CompletedProcess[str]:
    """Run each ``sandbox`` command line of ``commands`` in one fresh process; the process fails
    (non-zero status, the reason on stderr) if a command fails or any of :data:`HEAVY` was imported."""
    script = textwrap.dedent(
        f"""
        import sys
        from sandbox.cli import main

        for args in {commands!r}:
            try:
                main(args)
            except SystemExit as exit:
                assert not exit.code, exit.code
        heavy = {set(HEAVY)!r} & {{name.split(".")[0] for name in sys.modules}}
        assert not heavy, sorted(heavy)
        """
    )
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
