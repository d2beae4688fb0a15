"""Without ``sync_bn`` the teacher's BatchNorm statistics are averaged over the processes when read
(evaluation, checkpoints), not at every step: the result equals the per-step average (2 gloo processes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from test_distributed import accelerate_command, finish, free_port, launch_env, start

SCRIPT = '''
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

from sandbox.recipe import load_resolved_recipe
from sandbox.train.loop import start_run

recipe_path, out = Path(sys.argv[1]), Path(sys.argv[2])
for mode in ("each_step", "when_read"):
    AcceleratorState._reset_state()
    recipe, registry = load_resolved_recipe(recipe_path, [
        f"name={mode}", "train.iters=6", "train.sync_bn=false", "train.teacher_statistics=own", "train.threads=1",
        "train.log_every=100", "train.eval_every=100", "train.checkpoint_every=100",
    ], [])
    trainer = start_run(recipe, registry, resume=False, overwrite=True)
    rank = trainer.accelerator.process_index
    iteration = trainer.iteration
    iteration.teacher_buffers_read_each_step = mode == "each_step"  # what every step did before
    agree = iteration.agree_on_teacher
    seen = {}

    def agree_on_teacher():
        if iteration.teacher_buffers_differ and "before" not in seen:  # the processes' own statistics
            seen["before"] = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
        agree()

    iteration.agree_on_teacher = agree_on_teacher
    trainer.train()
    torch.save({"teacher": trainer.teacher.state_dict(), **seen}, out / f"{mode}_rank{rank}.pt")
'''


def test_the_teacher_averaged_when_read_equals_the_per_step_average(tiny_recipe: Path, tmp_path: Path) -> None:
    script = tmp_path / "teacher_buffers.py"
    script.write_text(SCRIPT)
    log = tmp_path / "launch.log"
    command = accelerate_command("--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                                 str(script), str(tiny_recipe), str(tmp_path))
    finish([start(command, launch_env(tmp_path), log)], [log])
    states = {(mode, rank): torch.load(tmp_path / f"{mode}_rank{rank}.pt", weights_only=True)
              for mode in ("each_step", "when_read") for rank in (0, 1)}
    reference = states["each_step", 0]["teacher"]
    buffers = [key for key in reference if "running_" in key]
    assert buffers
    for (mode, rank), state in states.items():
        for key, value in reference.items():
            other = state["teacher"][key]
            if key in buffers:
                torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=f"{mode} rank {rank}: {key}")
            else:  # parameters and counters: the average never feeds back into training (a train-mode teacher)
                assert torch.equal(other, value), f"{mode} rank {rank}: {key}"
    before = [states["when_read", rank]["before"] for rank in (0, 1)]
    assert any(not torch.equal(before[0][key], before[1][key]) for key in buffers), (
        "the processes' statistics differed before the average (the comparison can fail)"
    )
