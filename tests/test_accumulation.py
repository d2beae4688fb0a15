"""``train.total_batch_size``: the stream each accumulated micro-batch reads, the accumulation a launch
gets or its one-line error, and what ``sandbox plan`` traces. The training itself (1 process
accumulating 2 micro-batches against 2 processes) is compared in ``tests/test_parity.py``."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from sandbox.bench.plan import trace_plan
from sandbox.cli import main
from sandbox.data.views import MicroBatchStreamSampler, StreamSampler
from sandbox.errors import SandboxError
from sandbox.recipe import TrainSection, load_resolved_recipe
from sandbox.train.accumulation import batch_plan, mean_logs


def first(sampler: StreamSampler, count: int) -> list[tuple[int, int]]:
    return list(itertools.islice(iter(sampler), count))


@pytest.mark.parametrize("start_step", [0, 5])
def test_micro_batch_k_of_process_r_reads_what_process_r_times_k_plus_k_of_the_larger_run_reads(start_step: int) -> None:
    """2 processes x 2 micro-batches of 3 against the 4 processes of a run without accumulation, over
    several epochs of a 7-image dataset (micro-batches straddle epochs), from the start and from a resume."""
    size, seed, batch, processes, micro_batches, steps = 7, 11, 3, 2, 2, 4
    world = processes * micro_batches
    for rank in range(processes):
        stream = first(MicroBatchStreamSampler(size, seed, start_step, batch, processes, rank, micro_batches),
                       steps * micro_batches * batch)
        for step, micro_batch in itertools.product(range(steps), range(micro_batches)):
            offset = (step * micro_batches + micro_batch) * batch
            virtual = StreamSampler(size, seed, (start_step + step) * batch * world, world, rank * micro_batches + micro_batch)
            assert stream[offset:offset + batch] == first(virtual, batch), (rank, step, micro_batch)


def test_without_accumulation_the_micro_batch_stream_is_the_stream() -> None:
    for rank in range(3):
        expected = first(StreamSampler(10, 4, 6 * 2 * 3, 3, rank), 20)
        assert first(MicroBatchStreamSampler(10, 4, 6, 2, 3, rank, 1), 20) == expected


def settings(**values: object) -> TrainSection:
    return TrainSection(batch_size=4, loss_pixel_count="per_process", **values)


def test_the_accumulation_reaches_the_total_batch_on_any_divisor_of_it() -> None:
    assert batch_plan(settings(), 3).accumulation == 1
    for processes, accumulation in ((1, 4), (2, 2), (4, 1)):
        plan = batch_plan(settings(total_batch_size=16), processes)
        assert (plan.accumulation, plan.total) == (accumulation, 16)
        assert plan.record() == {"processes": processes, "micro_batch_size": 4, "accumulation_steps": accumulation,
                                 "total_batch_size": 16}


def test_a_total_a_launch_cannot_reach_exactly_is_a_one_line_error() -> None:
    with pytest.raises(SandboxError) as error:
        batch_plan(settings(total_batch_size=16), 3)
    assert str(error.value).startswith("train.total_batch_size = 16 is not a multiple of train.batch_size (4) x 3 processes = 12")
    assert "(it reaches 12 or 24)" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SandboxError, match=r"= 16 is not a multiple .* 8 processes = 32.*\(it reaches 32\)"):
        batch_plan(settings(total_batch_size=16), 8)


def test_accumulating_with_a_global_pixel_count_is_refused_and_without_accumulation_allowed() -> None:
    with pytest.raises(SandboxError, match="loss_pixel_count = 'global' divides each loss by the pixel count of the whole"):
        batch_plan(TrainSection(batch_size=4, total_batch_size=8), 1)
    assert batch_plan(TrainSection(batch_size=4, total_batch_size=8), 2).accumulation == 1


def test_sandbox_run_refuses_an_unreachable_total_in_one_line_before_writing(
    tiny_recipe: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--set", "train.total_batch_size=3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.strip().splitlines() == [
        "error: train.total_batch_size = 3 is not a multiple of train.batch_size (2) x 1 process = 2: this launch "
        "cannot accumulate to it exactly (it reaches 2 or 4); change the number of processes or batch_size"
    ]
    assert not (tiny_recipe.parent / "runs").exists()


def test_logged_values_are_each_micro_batchs_mean() -> None:
    logs = mean_logs([{"loss": torch.tensor(1.0), "only_first": torch.tensor(4.0), "host": 2.0},
                      {"loss": torch.tensor(3.0), "host": 4.0}])
    assert float(logs["loss"]) == 2.0 and float(logs["only_first"]) == 4.0 and logs["host"] == 3.0


def test_the_plan_traces_every_micro_batch_of_a_step(tiny_recipe: Path) -> None:
    """Twice the FLOPs per step, and a higher peak: the first micro-batch's gradients are held while the
    second runs (the training loop's own accumulation, traced)."""
    common = ["train.iters=1", "train.warmup_iters=0", "perturbation.name=none", "train.loss_pixel_count=per_process"]
    plans = []
    for total in (2, 4):
        resolved, registry = load_resolved_recipe(tiny_recipe, [*common, f"train.total_batch_size={total}"], None)
        plans.append(trace_plan(resolved, registry, num_classes=5, target="cpu"))
    one, two = plans
    assert (one.batches.accumulation, two.batches.accumulation) == (1, 2)
    assert two.steady.flops == 2 * one.steady.flops
    assert two.peak_bytes > one.peak_bytes
