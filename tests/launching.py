"""Launching processes from tests: free ports, CPU-only environments, ``accelerate launch``, bounded waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

LAUNCH_TIMEOUT_S = 240
"""How long a test waits for one launched process before killing it."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(tmp_path: Path) -> dict[str, str]:
    """CPU-only processes, one thread each, no user Accelerate config."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}


def accelerate_command(*options: str) -> list[str]:
    """``accelerate launch --multi_gpu ...`` with the flags that keep it from prompting or warning."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
        "--dynamo_backend", "no", *options,
    ]


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``command`` in its own process group, output to ``log``."""
    handle = log.open("w")
    try:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        handle.close()


def wait_bounded(processes: list[subprocess.Popen], timeout_s: float = LAUNCH_TIMEOUT_S) -> None:
    """Wait for every process (at most ``timeout_s`` each); kill every process group that is left."""
    try:
        for process in processes:
            process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def finish(processes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every process (bounded); kill every process group that is left; all must succeed."""
    wait_bounded(processes)
    for process, log in zip(processes, logs):
        assert process.returncode == 0, f"exit status {process.returncode}:\n{log.read_text()[-4000:]}"
