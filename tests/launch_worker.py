"""Run the shared launch's jobs one after another in this process (``tests/shared_launch.py``).

Arguments: the launch's root folder and a JSON list of ``[name, "module:function"]``. This process
is one of a launch's (``WORLD_SIZE``, ``RANK`` set) or a process of its own. Job ``name`` writes
under ``ROOT/world{W}/{name}``, its output goes to ``log_rank{R}.txt`` there, and ``done_rank{R}``
marks it finished on rank R (saying how long it took). A job that raises leaves ``error_rank{R}.txt``
and ends the process: a peer may be inside a collective it never reaches.
"""

import contextlib
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's standard output and error (file descriptors 1 and 2) to ``path`` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("w") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run(root: Path, jobs: list[list[str]]) -> None:
    """Run every job in order; end the process on the first failure."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    for name, target in jobs:
        folder = root / f"world{world}" / name
        folder.mkdir(parents=True, exist_ok=True)
        if "accelerate" in sys.modules:  # each job builds its own Accelerator (mixed precision, seeds ...)
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
        module, function = target.split(":")
        started = time.monotonic()
        with output_to(folder / f"log_rank{rank}.txt"):
            try:
                getattr(importlib.import_module(module), function)(folder)
            except BaseException:  # noqa: BLE001 - reported to the test, then this process ends
                (folder / f"error_rank{rank}.txt").write_text(f"rank {rank}:\n{traceback.format_exc()}")
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
        (folder / f"done_rank{rank}").write_text(f"{time.monotonic() - started:.1f} s\n")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # both are done before either tears the group down
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter's teardown, where gloo's threads can still abort (exit -6)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    run(Path(sys.argv[1]), json.loads(sys.argv[2]))
