"""One launch for every library-level multi-process check of a test session.

Starting a process that imports torch, torchvision, timm and Accelerate costs about 5 s of CPU on
this project's machine (a 2-process launch 14 s), most of a small multi-process check. The checks that drive the library
themselves (not the ``sandbox`` command) therefore share processes: one ``accelerate launch`` of 2
CPU (gloo) processes, and one process of its own for the one-process references, each running the
session's *jobs* one after another (``tests/launch_worker.py``).

A test module declares its jobs in ``LAUNCH_JOBS`` (name -> :class:`Job`) and its tests take the
session fixture ``shared_launch`` (``tests/conftest.py``); the launch runs the jobs of every module
with a selected test that takes the fixture, so ``pytest tests/test_sync_batchnorm.py`` runs only
that module's. A job writes what it computed under its folder; :meth:`SharedLaunch.folder` hands a
test that folder, or fails with the job's error. A job that fails ends its process (a peer may be
waiting in a collective it never reaches): the jobs after it are reported as not run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from launching import accelerate_command, free_port, launch_env, start, wait_bounded

RUNNER = Path(__file__).with_name("launch_worker.py")


@dataclass(frozen=True)
class Job:
    """A function of the folder it writes to, run on each process of every world size in ``worlds``
    (1: a process of its own, no process group; 2: the two processes of the launch)."""

    function: Callable[[Path], None]
    worlds: tuple[int, ...] = (2,)

    def target(self) -> str:
        """``module:function``, what the runner imports."""
        return f"{self.function.__module__}:{self.function.__qualname__}"


def jobs_of(items: Iterable[pytest.Item]) -> dict[str, Job]:
    """The jobs of every module with an item that takes the ``shared_launch`` fixture, by name."""
    jobs: dict[str, Job] = {}
    for item in items:
        if "shared_launch" not in getattr(item, "fixturenames", ()):
            continue
        for name, job in getattr(item.module, "LAUNCH_JOBS", {}).items():
            if jobs.setdefault(name, job) is not job:
                raise ValueError(f"two modules declare the launch job {name!r}")
    return jobs


def process_group() -> None:
    """Join the launch's gloo process group unless a job before (or Accelerate) did."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")


class SharedLaunch:
    """The outcome of the session's launch: each job's folder for each world size."""

    def __init__(self, root: Path, jobs: dict[str, Job], logs: dict[int, Path]) -> None:
        self.root, self.jobs, self.logs = root, jobs, logs

    def folder(self, name: str, world: int = 2) -> Path:
        """The folder job ``name`` wrote on ``world`` processes; fails with the job's error, or the log's
        end, if any of them did not finish it."""
        assert name in self.jobs and world in self.jobs[name].worlds, f"{name!r} is not a launch job on {world} processes"
        folder = self.root / f"world{world}" / name
        missing = [rank for rank in range(world) if not (folder / f"done_rank{rank}").exists()]
        if not missing:
            return folder
        errors = sorted(folder.glob("error_rank*.txt"))
        if errors:
            pytest.fail(f"launch job {name!r} failed on {world} process(es):\n" + "\n".join(p.read_text() for p in errors), False)
        pytest.fail(f"launch job {name!r} did not finish on rank(s) {missing} of {world} (an earlier job failed, or "
                    f"the launch did):\n{self.logs[world].read_text()[-4000:]}", False)

    def output(self, name: str, world: int = 2) -> str:
        """What job ``name``'s processes printed (standard output and error), rank after rank."""
        folder = self.root / f"world{world}" / name
        return "".join((folder / f"log_rank{rank}.txt").read_text() for rank in range(world))


def run_shared_launch(jobs: dict[str, Job], root: Path) -> SharedLaunch:
    """Run ``jobs`` on 2 launched processes and the one-process ones in a process of their own, side by side."""
    logs, processes = {}, []
    for world in (1, 2):
        targets = [[name, job.target()] for name, job in jobs.items() if world in job.worlds]
        if not targets:
            continue
        command = [sys.executable] if world == 1 else accelerate_command(
            "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()))
        logs[world] = root / f"world{world}.log"
        processes.append(start([*command, str(RUNNER), str(root), json.dumps(targets)], launch_env(root), logs[world]))
    wait_bounded(processes, timeout_s=600)
    return SharedLaunch(root, jobs, logs)
