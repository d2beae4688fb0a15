"""Speed levers (``train.channels_last``, ``compile``, ``optimizer_impl``, ``mixed_precision``) and
``sandbox bench --levers``.

Every lever off reproduces the default run bit for bit; each lever on trains the tiny recipe to
the same losses and parameters within a stated tolerance (measured on this project's CPU machine,
torch 2.14.1, 3 iterations of the tiny recipe; the tolerances leave a margin of 100 or more):

- ``channels_last``: the same convolutions in another layout, float rounding only: measured
  losses within 1e-7 relative, parameters within 3e-8 absolute; asked: 1e-5 and 1e-5.
- ``optimizer_impl`` ``foreach`` and ``fused``: the same update arithmetic: measured equal; asked:
  1e-6 and 1e-6.
- ``mixed_precision = "bf16"``: 8-bit mantissas in the networks' matmuls and convolutions: measured
  losses within 1.6e-3 relative and parameter updates within 0.17 relative (norm of the difference
  of the updates over the norm of float32's update: the same direction, cosine about 0.99);
  asked: 2e-2 and 0.5.
- ``compile`` (inductor, random ops falling back to eager's so dropout draws the same numbers):
  measured losses within 2e-7 relative, parameters within 6e-8 absolute; asked: 1e-5 and 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
from accelerate.state import AcceleratorState
from torch import Tensor, nn

from sandbox.api import SegmentationNetwork
from sandbox.bench.levers import EAGER_FP32, levers_for
from sandbox.bench.steps import synthetic_training
from sandbox.cli import main
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry
from sandbox.recipe import Recipe, TrainSection, load_recipe, resolve_components
from sandbox.train.levers import apply_network_levers, build_networks
from sandbox.train.student_pass import network_of

LEVERS_OFF = ["train.channels_last=false", "train.compile=false", "train.optimizer_impl=default", "train.mixed_precision=no"]
ITERATIONS = 3
NUM_CLASSES = 5


@dataclass
class Tolerance:
    """How far a lever's run may be from eager float32's."""

    loss_rtol: float
    param_atol: float | None = None
    """Largest absolute difference of any parameter after the iterations."""
    update_rtol: float | None = None
    """Largest ``||update - eager update|| / ||eager update||`` (the updates: parameters after minus before)."""


TOLERANCES = {
    "train.channels_last=true": Tolerance(loss_rtol=1e-5, param_atol=1e-5),
    "train.optimizer_impl=foreach": Tolerance(loss_rtol=1e-6, param_atol=1e-6),
    "train.optimizer_impl=fused": Tolerance(loss_rtol=1e-6, param_atol=1e-6),
    "train.mixed_precision=bf16": Tolerance(loss_rtol=2e-2, update_rtol=0.5),
}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """Each test may pick its own mixed precision, and leaves none behind for the next test."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def resolved(tiny_recipe: Path, overrides: list[str]) -> Recipe:
    return resolve_components(load_recipe(tiny_recipe, overrides), load_registry())


@dataclass
class Trained:
    losses: list[float]
    before: Tensor
    after: Tensor


def train_synthetic(recipe: Recipe) -> Trained:
    """``ITERATIONS`` of the recipe's own training iteration on one random batch (``sandbox bench``'s set-up)."""
    training = synthetic_training(recipe, load_registry(), NUM_CLASSES, recipe.perturbation)
    network = network_of(training.accelerator.unwrap_model(training.model))

    def flat() -> Tensor:
        return torch.cat([p.detach().float().reshape(-1) for p in network.parameters()])

    before = flat()
    losses = []
    for step in range(ITERATIONS):
        outcome = training.iteration(step, training.labeled, training.unlabeled, training.partners)
        assert outcome.finite and outcome.stepped
        losses.append(float(outcome.logs["loss"]))
    return Trained(losses, before, flat())


def assert_close(lever: Trained, eager: Trained, tolerance: Tolerance) -> None:
    assert torch.equal(lever.before, eager.before), "both start from the same weights"
    for ours, theirs in zip(lever.losses, eager.losses):
        assert abs(ours - theirs) <= tolerance.loss_rtol * abs(theirs), (lever.losses, eager.losses)
    if tolerance.param_atol is not None:
        assert float((lever.after - eager.after).abs().max()) <= tolerance.param_atol
    if tolerance.update_rtol is not None:
        update, eager_update = lever.after - lever.before, eager.after - eager.before
        assert float((update - eager_update).norm() / eager_update.norm()) <= tolerance.update_rtol


# -- every lever off ---------------------------------------------------------------------------------


def run_metrics(tiny_recipe: Path, overrides: list[str]) -> tuple[list[dict], dict]:
    """Train the tiny recipe; its metrics records and summary without the wall-clock figures."""
    sets = [part for override in overrides for part in ("--set", override)]
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--overwrite", *sets])
    assert exit_info.value.code == 0
    run = tiny_recipe.parent / "runs" / "tiny" / "seed3"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("images_per_s", None)
    summary = json.loads((run / "summary.json").read_text())
    return records, {key: summary[key] for key in ("final_miou", "best_miou", "final_per_class_iou", "skipped_updates")}


def test_every_lever_off_reproduces_the_default_run_bit_for_bit_and_channels_last_stays_close(tiny_recipe: Path) -> None:
    default = run_metrics(tiny_recipe, [])
    assert run_metrics(tiny_recipe, LEVERS_OFF) == default
    records, _ = run_metrics(tiny_recipe, ["train.channels_last=true"])  # the training loop applies the lever
    losses = [(r["loss"], d["loss"]) for r, d in zip(records, default[0]) if "loss" in r]
    assert losses and all(abs(ours - theirs) <= 1e-5 * abs(theirs) for ours, theirs in losses), losses


def test_levers_off_leave_the_networks_and_the_optimizer_as_torch_makes_them(tiny_recipe: Path) -> None:
    from sandbox.train.accelerator import make_accelerator
    from sandbox.train.builder import build_model

    recipe = resolved(tiny_recipe, [])
    networks = build_networks(build_model(recipe, load_registry(), NUM_CLASSES), make_accelerator("no"), recipe.train, 1e-3)
    for network in (networks.student, networks.teacher):
        assert not {"encode", "extract", "decode"} & set(vars(network)), "no method replaced"
        assert "forward" not in vars(network.classifier) and "forward" not in vars(network.final)
        assert all(p.is_contiguous() for p in network.parameters())
    for group in networks.optimizer.param_groups:
        assert group["foreach"] is None and group["fused"] is None, "torch's own choice"


# -- each lever on -----------------------------------------------------------------------------------


@pytest.mark.parametrize("override", list(TOLERANCES))
def test_each_lever_trains_like_eager_float32_within_its_tolerance(tiny_recipe: Path, override: str) -> None:
    eager = train_synthetic(resolved(tiny_recipe, LEVERS_OFF))
    AcceleratorState._reset_state()
    lever = train_synthetic(resolved(tiny_recipe, [*LEVERS_OFF, override]))
    assert_close(lever, eager, TOLERANCES[override])


@pytest.mark.slow
def test_compile_trains_like_eager_float32(tiny_recipe: Path) -> None:
    """Inductor on the tiny recipe (minutes on 2 CPU cores: compilation of each pass).

    The config's own ``patch`` (not pytest's monkeypatch, whose undo deletes the option from the
    config module: a later compile in this process then fails on the missing ``fallback_random``)."""
    with torch._inductor.config.patch(fallback_random=True):  # dropout: eager's random numbers
        eager = train_synthetic(resolved(tiny_recipe, LEVERS_OFF))
        AcceleratorState._reset_state()
        torch._dynamo.reset()
        try:
            lever = train_synthetic(resolved(tiny_recipe, [*LEVERS_OFF, "train.compile=true"]))
        finally:
            torch._dynamo.reset()
    assert_close(lever, eager, Tolerance(loss_rtol=1e-5, param_atol=1e-5))


class TinyNetwork(SegmentationNetwork):
    """Two convolutions: a network small enough to compile in seconds."""

    feature_channels = 4
    embedding_channels = 4

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.classifier = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.final = nn.Conv2d(4, 3, 1)

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())


@pytest.mark.slow  # inductor's first compile: half a minute of CPU; test_compile_trains_like_eager_float32 covers it
def test_compile_of_a_small_network_equals_eager_in_value_and_gradient() -> None:
    torch.manual_seed(0)
    eager = TinyNetwork()
    compiled = TinyNetwork()
    compiled.load_state_dict(eager.state_dict())
    settings = TrainSection(compile=True)
    torch._dynamo.reset()
    try:
        apply_network_levers(compiled, settings, torch.device("cpu"))
        assert compiled.state_dict().keys() == eager.state_dict().keys(), "checkpoints keep their keys"
        images = torch.randn(2, 3, 16, 16)
        ours, theirs = compiled(images), eager(images)
        (ours.logits.square().mean() + ours.embedding.mean()).backward()
        (theirs.logits.square().mean() + theirs.embedding.mean()).backward()
    finally:
        torch._dynamo.reset()
    assert torch.allclose(ours.logits, theirs.logits, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), name
    assert "encode" in vars(compiled) and "forward" in vars(compiled.classifier), "the compiled parts"


def test_channels_last_puts_weights_and_every_network_input_in_nhwc(tiny_recipe: Path) -> None:
    recipe = resolved(tiny_recipe, ["train.channels_last=true"])
    training = synthetic_training(recipe, load_registry(), NUM_CLASSES, recipe.perturbation)
    student = network_of(training.accelerator.unwrap_model(training.model))
    teacher = training.iteration.teacher
    seen: list[tuple[str, bool]] = []
    for name, network in (("student", student), ("teacher", teacher)):
        convolutions = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions), name
        first = convolutions[0]
        first.register_forward_pre_hook(
            lambda module, args, name=name: seen.append((name, args[0].is_contiguous(memory_format=torch.channels_last)))
        )
    training.iteration(0, training.labeled, training.unlabeled, training.partners)
    assert {name for name, _ in seen} == {"student", "teacher"} and all(nhwc for _, nhwc in seen), seen


def test_bf16_autocasts_the_networks_on_a_cpu_and_the_density_estimator_stays_float32(tiny_recipe: Path) -> None:
    recipe = resolved(tiny_recipe, ["train.mixed_precision=bf16"])
    training = synthetic_training(recipe, load_registry(), NUM_CLASSES, recipe.perturbation)
    student = network_of(training.accelerator.unwrap_model(training.model))
    density = training.iteration.step_fn.method.density
    assert density is not None, "the tiny recipe's DDFP trains a density estimator"
    dtypes: dict[str, set[torch.dtype]] = {"network": set(), "density": set()}

    def record(kind: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, Tensor) and output.is_floating_point():
                dtypes[kind].add(output.dtype)
        return hook

    for module in student.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(record("network"))
    for module in density.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(record("density"))
    outcome = training.iteration(0, training.labeled, training.unlabeled, training.partners)
    assert outcome.finite and "density_nll" in outcome.logs
    assert dtypes["network"] == {torch.bfloat16}, "Accelerate's bf16 autocast runs on the CPU"
    assert dtypes["density"] == {torch.float32}, "the density estimator computes in float32"
    assert all(p.dtype == torch.float32 for p in density.parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters()), "float32 master weights"


# -- impossible combinations -------------------------------------------------------------------------


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_fused_optimizer_with_fp16_is_a_one_line_error_naming_the_key(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(
        ["recipe", "show", str(tiny_recipe), "--set", "train.optimizer_impl=fused", "--set", "train.mixed_precision=fp16"],
        capsys,
    )
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "train.optimizer_impl = 'fused'" in err and "train.mixed_precision = 'fp16'" in err


def test_an_unknown_optimizer_impl_is_a_one_line_error(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["recipe", "show", str(tiny_recipe), "--set", "train.optimizer_impl=apex"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "train.optimizer_impl = 'apex'" in err, err


def test_compile_without_a_cpp_compiler_is_a_one_line_error(
    tiny_recipe: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor import cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    code, _, err = run_cli(["run", str(tiny_recipe), "--set", "train.compile=true"], capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "train.compile = true" in err and "C++ compiler" in err
    with pytest.raises(SandboxError, match="train.compile"):
        apply_network_levers(TinyNetwork(), TrainSection(compile=True), torch.device("cpu"))


# -- sandbox bench --levers --------------------------------------------------------------------------


def test_the_lever_rows_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = [lever.label for lever in levers_for(torch.device("cpu"))]
    assert cpu[:3] == ["eager fp32", "channels_last", "compile"] and "bf16" in cpu and "fp16" not in cpu
    assert "optimizer foreach" in cpu and "optimizer fused" in cpu
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    cuda = [lever.label for lever in levers_for(torch.device("cuda"))]
    assert "fp16" in cuda and "bf16" in cuda
    for lever in levers_for(torch.device("cuda")):
        TrainSection.model_validate({**EAGER_FP32, **lever.settings})  # every row is a valid recipe


def test_bench_levers_times_each_lever_through_the_training_loops_networks(
    tiny_recipe: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row but those that compile (minutes of compilation on a CPU: see the slow test below),
    chosen with ``--only`` (the eager row is always kept)."""
    import sandbox.bench.steps as bench_steps

    rows = [lever for lever in levers_for(torch.device("cpu")) if not lever.settings.get("compile")]
    assert len(rows) == 5
    built: list[TrainSection] = []
    real = bench_steps.build_networks

    def spying(model, accelerator, settings, lr):  # noqa: ANN001, ANN202
        built.append(settings)
        return real(model, accelerator, settings, lr)

    monkeypatch.setattr(bench_steps, "build_networks", spying)
    code, out, _ = run_cli(["bench", str(tiny_recipe), "--levers", "--only", "fused,bf16, channels_last,foreach",
                            "--steps", "1", "--warmup", "0", "--set", "train.mixed_precision=fp16"], capsys)
    assert code == 0
    table = [line for line in out.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in table] == [lever.label for lever in rows]
    assert table[0].split("│")[5].strip() == "1.00" and all(line.split("│")[6].strip() == "-" for line in table)
    assert [line.split("│")[2].strip() for line in table] == [lever.settings.get("mixed_precision", "no") for lever in rows]
    for lever, settings in zip(rows, built):
        expected = {**EAGER_FP32, **lever.settings}
        assert {key: getattr(settings, key) for key in expected} == expected, lever.label


@pytest.mark.slow
def test_bench_levers_prints_every_row_with_compile(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["bench", str(tiny_recipe), "--levers", "--steps", "1", "--warmup", "1"], capsys)
    assert code == 0
    labels = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert labels == [lever.label for lever in levers_for(torch.device("cpu"))]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--levers", "--only", "fp16"], "--only: no lever 'fp16' on cpu; expected some of eager, channels_last, compile, bf16"),
        (["--levers", "--only", " , "], "--only: expected comma-separated lever names"),
        (["--only", "bf16"], "--only chooses rows of the --levers table: pass --levers too"),
    ],
)
def test_bench_only_names_the_valid_levers(
    tiny_recipe: Path, capsys: pytest.CaptureFixture, options: list[str], message: str
) -> None:
    code, out, err = run_cli(["bench", str(tiny_recipe), *options, "--steps", "1", "--warmup", "0"], capsys)
    assert code == 2 and message in err and err.strip().count("\n") == 0 and "│" not in out


def test_bench_data_with_levers_is_a_one_line_error(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["bench", str(tiny_recipe), "--data", "--levers"], capsys)
    assert code == 2 and "--data and --levers" in err and err.strip().count("\n") == 0


# -- benchmarks/gpu_check.sh -------------------------------------------------------------------------

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def gpu_check(tmp_path: Path, dry: bool, timeout: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DRY": "1" if dry else "0"}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(GPU_CHECK), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_without_cuda_stops_with_one_clear_line(tmp_path: Path) -> None:
    result = gpu_check(tmp_path, dry=False, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "no CUDA device" in result.stderr and "GPU_CHECK_DRY=1" in result.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_on_a_cpu_runs_every_phase_and_prints_one_summary(tmp_path: Path) -> None:
    """The whole script at tiny sizes (minutes on 2 CPU cores): GPU tests, both lever tables, the
    BatchNorm classes (the project's alone on a CPU), UniMatch V2's benches, the summary."""
    result = gpu_check(tmp_path, dry=True, timeout=3600)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert result.returncode == 0, summary
    for phase in ("gpu_tests", "ddfp_levers", "unimatch_levers", "batchnorm", "v2", "plan_check"):
        assert f"{phase}: ok, " in summary
    assert "logits and gradients equal to one process's on the whole batch within 0.001: yes" in summary
    assert "5 passed" in summary and summary.count("peak memory:") == 5
    assert summary.count("speed levers:") == 2 and "ddfp_pascal" in summary and "unimatch_pascal" in summary
    assert "unimatch_v2_pascal" in summary and "unimatch_v2_ddfp_pascal" in summary
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])


@pytest.mark.parametrize(
    ("overrides", "read"),
    [([], True), (["train.pseudo_labels=student", "eval.model=student"], False), (["train.pseudo_labels=student"], True)],
)
def test_the_bench_updates_the_teacher_only_where_a_run_would(tiny_recipe: Path, overrides: list[str], read: bool) -> None:
    """The bench times the run's iteration: no EMA update where nothing reads the teacher (UniMatch)."""
    recipe = resolved(tiny_recipe, overrides)
    training = synthetic_training(recipe, load_registry(), NUM_CLASSES, recipe.perturbation)
    assert training.iteration.teacher_read is read
