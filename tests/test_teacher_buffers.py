"""Without ``sync_bn`` the teacher's BatchNorm statistics are averaged over the processes when read
(evaluation, checkpoints), not at every step: the result equals the per-step average (2 gloo processes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import write_tiny_recipe
from shared_launch import Job, SharedLaunch

MODES = ("each_step", "when_read")


def train_both_ways(folder: Path) -> None:
    """Launch job: the tiny recipe without ``sync_bn`` trained twice, the teacher's statistics averaged
    at every step and when read; saves ``{mode}_rank{i}.pt`` (the end teacher, and the processes' own
    statistics before the first average)."""
    from accelerate.state import AcceleratorState

    from sandbox.recipe import load_resolved_recipe
    from sandbox.train.loop import start_run

    recipe_path = write_tiny_recipe(folder)
    for mode in MODES:
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

        def agree_on_teacher() -> None:
            if iteration.teacher_buffers_differ and "before" not in seen:  # the processes' own statistics
                seen["before"] = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
            agree()

        iteration.agree_on_teacher = agree_on_teacher
        trainer.train()
        torch.save({"teacher": trainer.teacher.state_dict(), **seen}, folder / f"{mode}_rank{rank}.pt")


LAUNCH_JOBS = {"teacher_buffers": Job(train_both_ways)}


def test_the_teacher_averaged_when_read_equals_the_per_step_average(shared_launch: SharedLaunch) -> None:
    folder = shared_launch.folder("teacher_buffers")
    states = {(mode, rank): torch.load(folder / f"{mode}_rank{rank}.pt", weights_only=True)
              for mode in MODES for rank in (0, 1)}
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
