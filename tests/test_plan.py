"""``sandbox plan``: the traced peak memory, FLOPs and verdict of a recipe's training step, without a GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sandbox.bench.plan import (
    ACTIVATIONS, BATCH, GRADIENTS, OPTIMIZER, PARAMETERS, TEACHER, measure_plan_steps, trace_plan,
)
from sandbox.cli import main
from sandbox.recipe import load_resolved_recipe

ONE_STEP = ["--set", "train.iters=1", "--set", "train.warmup_iters=0", "--set", "perturbation.name=none"]
"""A run of one semi-supervised step without a perturbation: one traced step, the quickest plan."""


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def plan_of(recipe: Path, *overrides: str, target: str = "cuda"):  # noqa: ANN201
    resolved, registry = load_resolved_recipe(recipe, list(overrides), None)
    return trace_plan(resolved, registry, num_classes=5, target=target), resolved


def test_plan_prints_memory_flops_verdict_and_time(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["plan", str(tiny_recipe), "--processes", "2", "--gpu", "H100", "--utilisation", "0.5"], capsys)
    assert code == 0, err
    assert "crop 32, 2 labeled + 2 unlabeled images per process on 2 processes: total batch 4 + 4, 6 iterations" in out
    assert re.search(r"parameters: student [\d.]+ M \([\d.]+ M trainable\), EMA teacher", out)
    assert re.search(r"peak memory per process: [\d.]+ MiB \(at step \d: semi-supervised\)", out)
    assert "DDP gradient buckets" in out, "2 processes: DDP's copy of the gradients"
    # the tiny run: 2 warm-up steps, then 4 semi-supervised ones
    assert re.search(r"FLOPs per run: .* = 2 x [\d.]+ GFLOP \(supervised warm-up\) \+ 4 x [\d.]+ GFLOP \(semi-supervised\)", out)
    assert re.search(r"^fits: [\d.]+ GiB .* of 80 GiB \(H100 SXM\)$", out, flags=re.M)
    assert re.search(r"^time \(an estimate\): .* on 2 x H100 SXM, assuming 50% of the peak", out, flags=re.M)


def test_the_verdict_flips_with_the_gpu_memory(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["plan", str(tiny_recipe), *ONE_STEP, "--gpu-memory", "64"], capsys)
    needed = float(re.search(r"^fits: ([\d.]+) GiB", out, flags=re.M).group(1))
    assert code == 0 and "of 64 GiB (--gpu-memory)" in out
    code, out, _ = run_cli(["plan", str(tiny_recipe), *ONE_STEP, "--gpu-memory", f"{needed * 0.95:.3f}"], capsys)
    assert code == 0
    verdicts = [line for line in out.splitlines() if line.startswith(("fits", "does not fit"))]
    assert len(verdicts) == 1 and verdicts[0].startswith(f"does not fit: {needed:.2f} GiB"), verdicts


def test_the_peak_holds_the_state_a_step_needs_and_matches_a_measured_cpu_step(tiny_recipe: Path) -> None:
    """Exact figures: the student's parameters and buffers, its gradients, SGD's momentum and the
    teacher at the peak; the whole peak within 25% of the live tensor memory a real CPU step holds
    (torch's profiler), the same steps of the same recipe traced for this CPU."""
    plan, resolved = plan_of(tiny_recipe, target="cpu")
    registry = load_resolved_recipe(tiny_recipe, [], None)[1]
    measured = measure_plan_steps(resolved, registry, num_classes=5)
    assert measured.device == "cpu"
    assert 0.75 <= plan.peak_bytes / measured.peak_bytes <= 1.25, (plan.peak_bytes, measured.peak_bytes)

    from sandbox.train.builder import build_model

    model = build_model(resolved, registry, 5)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    crop, images = resolved.train.crop_size, resolved.train.batch_size + 2 * resolved.train.unlabeled_batch_size
    breakdown = plan.peak.breakdown
    assert breakdown[PARAMETERS] == breakdown[TEACHER] == weights + buffers
    assert breakdown[GRADIENTS] == breakdown[OPTIMIZER] == weights, "a gradient and a momentum per weight"
    # labeled images and masks, weak and strong views, the padding (masks int64, padding bool)
    assert breakdown[BATCH] == crop * crop * (4 * 3 * images + 8 * 2 + 2)
    assert plan.peak_bytes > 2 * (weights + buffers) + 2 * weights


def test_flops_grow_with_the_pixels(tiny_recipe: Path) -> None:
    small = plan_of(tiny_recipe, *ONE_STEP[1::2])[0].steady
    large = plan_of(tiny_recipe, *ONE_STEP[1::2], "train.crop_size=64")[0].steady
    assert 3.6 <= large.flops / small.flops <= 4.4, "x4 pixels: about x4 FLOPs for a convolutional network"
    assert large.conv_flops > 0.8 * large.flops
    assert large.peak_bytes > small.peak_bytes


def test_mixed_precision_shrinks_the_activations(tiny_recipe: Path) -> None:
    """fp16 is traced as a GPU runs it (half-precision activations, float32 where CUDA's autocast
    keeps float32: the interpolated logits, the losses), not as this CPU would (float32)."""
    sizes = [*ONE_STEP[1::2], "train.crop_size=256"]
    full = plan_of(tiny_recipe, *sizes)[0]
    half = plan_of(tiny_recipe, *sizes, "train.mixed_precision=fp16")[0]
    assert half.traced_precision == "bf16" and half.precision == "fp16"
    assert half.peak.breakdown[PARAMETERS] == full.peak.breakdown[PARAMETERS], "the weights stay float32"
    ratio = half.peak.breakdown[ACTIVATIONS] / full.peak.breakdown[ACTIVATIONS]
    assert 0.5 < ratio < 0.8, ratio


def test_cuda_autocast_policy_casts_as_cuda_and_is_undone() -> None:
    from sandbox.bench.cuda_autocast import cuda_autocast_policy

    images, weight = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)

    def dtypes() -> tuple[torch.dtype, ...]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = F.conv2d(images, weight)
            return (features.dtype, F.interpolate(features, scale_factor=2, mode="bilinear").dtype,
                    features.softmax(1).dtype, F.layer_norm(features, (6,)).dtype, features.relu().dtype)

    cpu = dtypes()
    with cuda_autocast_policy():
        assert dtypes() == (torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.bfloat16)
    assert dtypes() == cpu == (torch.bfloat16,) * 5


def test_attention_flops_are_counted_on_the_cpu() -> None:
    """The CPU runs its own flash attention kernel, which torch's counter does not know: a ViT's
    attention would count nothing. Counted with torch's formula of the CUDA kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    from sandbox.bench.plan import flop_counter

    shape = (2, 6, 257, 64)
    with FakeTensorMode():
        query = torch.randn(shape, requires_grad=True)
        with flop_counter() as counter:
            F.scaled_dot_product_attention(query, query, query).sum().backward()
    assert counter.get_total_flops() == sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--gpu-memory", "0"], "--gpu-memory"),
        (["--gpu-memory", "-4"], "--gpu-memory"),
        (["--gpu-throughput", "0"], "--gpu-throughput"),
        (["--gpu", "B200"], "--gpu"),
        (["--gpu", "H100", "--gpu-throughput", "500"], "--gpu-throughput"),
        (["--utilisation", "1.5"], "--utilisation"),
        (["--utilisation", "0"], "--utilisation"),
        (["--processes", "0"], "--processes"),
        (["--gpu-memory", "lots"], "--gpu-memory"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else value,
)
def test_bad_options_are_one_line_errors(tiny_recipe: Path, capsys: pytest.CaptureFixture, options: list[str], named: str) -> None:
    code, out, err = run_cli(["plan", str(tiny_recipe), *options], capsys)
    assert code == 2 and not out
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
