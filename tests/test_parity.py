"""N processes train the model one process trains (README, "What N processes compute").

The same recipes run on 1 process with the global batch (4 labeled + 4 unlabeled images) and on 2
CPU (gloo) processes with 2 + 2 each, ``sync_bn = true``; the random draws are made equal: no
dropout (UniMatch's feature dropout becomes a fixed channel mask, :func:`fixed_channel_dropout`),
threshold 0 (every non-padding pixel trusted: the counts still differ between processes, through
padding) except in ``ddfp_glow_threshold``, where the processes trust unequal numbers of pixels, no
estimator input noise and no pixel sampling, CutMix off with in-batch partners and a fixed box with
a partner stream. Every run starts from the same supervised warm start (:func:`warm_start`), so that
its predictions cover several classes and the mIoU compared tells models apart. The consistency losses are the soft KL: a hard
pseudo-label (argmax) flips where two classes are tied within float noise, which moves a few
parameters by up to 2e-3 of their norm (measured with "ce"): a discrete choice, not a difference
of what the processes compute. After warm-up and several semi-supervised steps
every parameter and buffer of the student, the EMA teacher and the density estimator (Adam's
moments included), and every logged value, equal one process's up to float tolerance. A control
run without ``sync_bn`` must differ (the comparison can fail).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from shared_launch import Job, SharedLaunch, process_group

RECIPE = """
name = "parity"
seed = 5
output_dir = "{output_dir}"

[dataset]
name = "shapes"
num_labeled = 8
num_unlabeled = 16
num_val = 4
image_size = 40

[backbone]
name = "timm"
model = "resnet18"

[model]
aspp_dilations = [1, 2, 3]
channels = 16
low_level_channels = 8
dropout = 0.0

[density]
name = "glow"
hidden = 16
sampled_pixels = 100000
input_noise = 0.0

[perturbation]
name = "ddfp"

[consistency.strong]
name = "kl"

[consistency.perturbed]
name = "kl"

[train]
iters = 6
warmup_iters = 2
perturbation_start_iters = 2
lr = 0.01
crop_size = 32
scale_range = [0.7, 1.3]
threshold = 0.0
cutmix_p = 0.0
sync_bn = true
log_every = 1
eval_every = 6
checkpoint_every = 6
"""

UNIMATCH = [
    "train.pseudo_labels=student", "train.strong_views=2", "train.cutmix_partners=stream", "train.cutmix_p=1.0",
    "train.perturbed_view=weak", "train.unsupervised_normalisation=image_pixels", "train.threshold_inclusive=true",
    "train.supervised_weight=0.5", "train.unsupervised_weight=0.25", "train.perturbed_weight=0.25",
    "model.mix_bn=false", "eval.model=student",
]

CONFIGS: dict[str, list[str]] = {
    "mean_teacher": ["perturbation.name=none"],
    "ddfp_glow": [],
    "ddfp_nflows": ["density.name=nflows", "density.sampled_pixels=100000", "density.input_noise=0.0"],
    # Adam's first steps are sign steps (m/sqrt(v) = g/|g|): a mean element whose pooled gradient is
    # within float noise of zero moves +-lr either way (measured: one component 3.3e-3 apart with lr
    # 1e-2, the student following through DDFP's direction); lr 1e-4 bounds that below the tolerance.
    "ddfp_gmm": ["density.name=gmm", "density.sampled_pixels=100000", "density.input_noise=0.0", "density.lr=0.0001"],
    "unimatch": [*UNIMATCH, "perturbation.name=dropout", "perturbation.p=0.5", "train.perturb_at=encoder"],
    "unimatch_ddfp": [*UNIMATCH, "model.mix_bn=true"],
    "control_without_sync_bn": ["perturbation.name=none", "train.sync_bn=false"],
    "ddfp_glow_bf16": ["train.mixed_precision=bf16"],
    "ddfp_glow_threshold": ["train.threshold=0.5"],
    # train.total_batch_size = 4 with 2 + 2 images per micro-batch: 1 process accumulates 2 micro-batches,
    # 2 processes take one each (the mean teacher: no estimator, whose updates differ by design)
    "accumulated": ["perturbation.name=none", "train.sync_bn=false", "train.loss_pixel_count=per_process",
                    "train.total_batch_size=4"],
    "accumulated_sync_bn": ["perturbation.name=none", "train.loss_pixel_count=per_process", "train.total_batch_size=4"],
}
"""Configurations trained on 1 and on 2 processes. ``ddfp_glow_bf16`` is compared against its own noise
floor (:func:`test_bf16_on_two_processes_differs_from_one_process_less_than_bf16_from_float32`)."""

MIXED_PRECISION = {"ddfp_glow_bf16": "ddfp_glow"}
"""Each mixed-precision configuration and its float32 twin."""

ACCUMULATED = ("accumulated", "accumulated_sync_bn")
"""Configurations of 2 + 2 images per micro-batch on every world: 1 process accumulates 2 of them a step."""

WARM_START_STEPS = 25
"""Supervised steps of :func:`warm_start` before every configuration's run: from scratch, 6 steps
leave the tiny model predicting background everywhere (every run's mIoU was 0.1506, whatever it
learnt); warm, it predicts several classes and the mIoU of two different models differs."""


def warm_start(recipe_path: Path) -> dict[str, torch.Tensor]:
    """The network of the parity recipe after :data:`WARM_START_STEPS` plain supervised steps (SGD on its
    labeled images, one process's computation, made alike in every process of every launch)."""
    import torch.nn.functional as F

    from sandbox.data.views import normalize
    from sandbox.plugins import load_registry
    from sandbox.recipe import load_recipe, resolve_components
    from sandbox.train.builder import build_dataset, build_model

    registry = load_registry()
    recipe = resolve_components(load_recipe(recipe_path), registry)
    source = build_dataset(recipe, registry)
    torch.manual_seed(recipe.seed)
    network = build_model(recipe, registry, source.num_classes)
    images = normalize(torch.stack([image for image, _ in source.labeled]))
    masks = torch.stack([mask for _, mask in source.labeled])
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    for _ in range(WARM_START_STEPS):
        optimizer.zero_grad()
        F.cross_entropy(network(images)[0], masks, ignore_index=source.ignore_index).backward()
        optimizer.step()
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


def warm_value(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The value of ``key`` in the warm start ``state`` (:func:`warm_start`, made with Mix BN: a network
    without it takes the main statistics, ``classifier.1.main.weight`` as ``classifier.1.weight``)."""
    module, _, name = key.rpartition(".")
    return state[key] if key in state else state[f"{module}.main.{name}"]


def starting_from(build: Callable[..., Any], state: dict[str, torch.Tensor]) -> Callable[..., Any]:
    """``build_model`` whose network starts from ``state`` (:func:`warm_value` of each of its keys)."""

    def build_warm(*args: Any, **kwargs: Any) -> Any:
        network = build(*args, **kwargs)
        network.load_state_dict({key: warm_value(state, key) for key in network.state_dict()})
        return network

    return build_warm


def fixed_channel_dropout(self: Any, features: torch.Tensor, context: Any) -> torch.Tensor:
    """UniMatch's channel dropout with a fixed draw: every other channel zeroed, the rest doubled (p =
    0.5), the same in every image on every process (a random draw differs between 1 and 2 processes)."""
    keep = (torch.arange(features.shape[1], device=features.device) % 2 == 0).to(features.dtype) * 2.0
    return features * keep.view(1, -1, *[1] * (features.dim() - 2))


def fixed_boxes(batch: int, height: int, width: int, p: float, generator: torch.Generator, box: str = "unimatch",
                decision: str = "sample", device: str = "cpu") -> torch.Tensor:
    """The same box in every image (none with p = 0): CutMix pairs each image with its own partner-stream image."""
    masks = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    if p > 0:
        masks[:, height // 4 : height // 2, width // 3 : 3 * width // 4] = True
    return masks


def train_every_configuration(folder: Path) -> None:
    """Launch job: train every configuration of :data:`CONFIGS` on this launch's processes with the global
    batch split between them; save each end state to ``folder/NAME/rank{i}.pt`` (runs under ``folder/runs``)."""
    from accelerate.state import AcceleratorState

    import sandbox_builtins.perturbations as perturbations_module
    import sandbox.train.loop as loop_module
    import sandbox.train.step as step_module
    from sandbox.plugins import load_registry
    from sandbox.recipe import load_recipe, resolve_components
    from sandbox.train.loop import start_run
    from sandbox.train.student_pass import network_of

    recipe_path = folder / "parity.toml"
    recipe_path.write_text(RECIPE.format(output_dir=(folder / "runs").as_posix()))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    registry = load_registry()
    original_boxes, step_module.cutmix_boxes = step_module.cutmix_boxes, fixed_boxes
    if world > 1:  # computed once, on the main process
        process_group()
        shared = [warm_start(recipe_path) if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        warm = shared[0]
    else:
        warm = warm_start(recipe_path)
    torch.save(warm, folder / "warm_start.pt")
    original_build, loop_module.build_model = loop_module.build_model, starting_from(loop_module.build_model, warm)
    dropout = perturbations_module.FeatureDropout
    original_dropout, dropout.forward = dropout.forward, fixed_channel_dropout
    denominators: list[int] = []
    original_denominator = step_module.SemiSupervisedStep.loss_denominator

    def recorded_denominator(self: Any, valid: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        result = original_denominator(self, valid, padding)
        denominators.append(int(result))  # this process's trusted (or non-padding) pixels of each loss
        return result

    step_module.SemiSupervisedStep.loss_denominator = recorded_denominator
    try:
        for name, overrides in CONFIGS.items():
            AcceleratorState._reset_state()  # its mixed precision is set once per process; PartialState stays
            micro_batch = 2 if name in ACCUMULATED else 4 // world
            per_process = [f"train.batch_size={micro_batch}", f"train.unlabeled_batch_size={micro_batch}"]
            recipe = load_recipe(recipe_path, [*overrides, *per_process, f"name={name}_{world}"])
            recipe = resolve_components(recipe, registry)
            trainer = start_run(recipe, registry, resume=False, overwrite=False)
            denominators.clear()
            summary = trainer.train()
            student = network_of(trainer.accelerator.unwrap_model(trainer.model))
            density = trainer.method.density
            state = {
                "student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
                "teacher": {k: v.detach().cpu() for k, v in trainer.teacher.state_dict().items()},
                "density": {k: v.detach().cpu() for k, v in density.state_dict().items()} if density is not None else {},
                "density_adam": density.optimizer_state()["optimizer"]["state"] if density is not None else {},
                "miou": summary["final_miou"],
                "batches": {key: summary[key] for key in ("processes", "micro_batch_size", "accumulation_steps", "total_batch_size")},
                "per_class_iou": summary["final_per_class_iou"],
                "denominators": list(denominators),
                "broadcast_buffers": getattr(trainer.model, "broadcast_buffers", None),  # DDP's, on 2 processes
            }
            (folder / name).mkdir(parents=True, exist_ok=True)
            torch.save(state, folder / name / f"rank{trainer.accelerator.process_index}.pt")
            trainer.accelerator.wait_for_everyone()
    finally:
        step_module.cutmix_boxes = original_boxes
        loop_module.build_model = original_build
        dropout.forward = original_dropout
        step_module.SemiSupervisedStep.loss_denominator = original_denominator


LAUNCH_JOBS = {"parity": Job(train_every_configuration, worlds=(1, 2))}

UPDATE_TOLERANCE = 1e-2
"""Student and teacher, each tensor: the difference of its change since the warm start, relative to
that change's norm (measured: below 1e-4, one tensor of the mean teacher 3.4e-3). Their values
themselves would hide a bug: 6 steps move them by about 1e-3 of their norm."""
TOTAL_UPDATE_TOLERANCE = 1e-5
"""Student and teacher, all their floating tensors as one vector: the same relative difference of the
change. Float noise averages out over the network (measured: at most 8.6e-7); a bug does not (the
perturbed loss divided by this process's own pixel count: 6.8e-5 to 5e-3, by configuration)."""
UPDATE_ABSOLUTE_TOLERANCE = 2e-7
"""For tensors that barely changed (a BatchNorm bias deep in the network: changes of 4e-6, measured
differences up to 4e-8)."""

RELATIVE_TOLERANCE = 1e-4
"""Float noise: summation order differs between one batch of 4 and two of 2. A tensor's difference is
measured relative to its norm (measured: below 1e-5; a handful of elements can differ by more, where a
density-descending direction was normalised from a near-zero gradient). Without sync_bn: 1e-2 and more."""
ABSOLUTE_TOLERANCE = 2e-6
"""For tensors near zero (a BatchNorm bias that started at 0): measured up to 3e-7."""


def assert_tensor_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Integers exactly; floats within :data:`RELATIVE_TOLERANCE` of ``expected``'s norm."""
    assert actual.shape == expected.shape, what
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    difference = float((actual.double() - expected.double()).norm())
    bound = RELATIVE_TOLERANCE * float(expected.double().norm()) + ABSOLUTE_TOLERANCE
    assert difference <= bound, f"{what}: |difference| {difference:.3g} > {bound:.3g} (norm {float(expected.norm()):.3g})"


@pytest.fixture
def parity_runs(shared_launch: SharedLaunch) -> dict[int, Path]:
    """Every configuration trained on 1 process and on 2 processes (the session's shared launch), by world size."""
    return {world: shared_launch.folder("parity", world) for world in (1, 2)}


def load_states(outs: dict[int, Path], name: str) -> tuple[dict, list[dict]]:
    """One process's end state and each of the two processes' end states of configuration ``name``."""
    single = torch.load(outs[1] / name / "rank0.pt", weights_only=True)
    pair = [torch.load(outs[2] / name / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    return single, pair


def metrics(outs: dict[int, Path], name: str, world: int) -> list[dict]:
    """The training records (not evaluation) of the run of ``name`` on ``world`` processes."""
    path = next((outs[world] / "runs").glob(f"{name}_{world}/*/metrics.jsonl"))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    drop = {"images_per_s", "lr"}
    return [{k: v for k, v in r.items() if k not in drop} for r in records if "loss" in r]


def assert_change_close(actual: torch.Tensor, expected: torch.Tensor, start: torch.Tensor, what: str) -> None:
    """``actual`` changed from ``start`` as ``expected`` did: within :data:`UPDATE_TOLERANCE` of the
    change's norm (integers exactly)."""
    assert actual.shape == expected.shape, what
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    difference = float((actual.double() - expected.double()).norm())
    change = float((expected.double() - start.double()).norm())
    bound = UPDATE_TOLERANCE * change + UPDATE_ABSOLUTE_TOLERANCE
    assert difference <= bound, f"{what}: |difference| {difference:.3g} > {bound:.3g} (change since the warm start {change:.3g})"


def total_change_difference(single: dict, other: dict, start: dict[str, torch.Tensor]) -> float:
    """``|change of other - change of single| / |change of single|`` over every floating tensor of the student
    and the teacher together (changes since ``start``, the warm start)."""
    difference = change = 0.0
    for part in ("student", "teacher"):
        for key, value in single[part].items():
            if value.is_floating_point():
                begin = warm_value(start, key).double()
                difference += float((other[part][key].double() - value.double()).pow(2).sum())
                change += float((value.double() - begin).pow(2).sum())
    return (difference / change) ** 0.5


def assert_states_close(single: dict, other: dict, part: str, start: dict[str, torch.Tensor] | None = None) -> None:
    """Every tensor of ``single[part]`` equals ``other[part]``'s: their changes since ``start`` (the warm
    start, :func:`assert_change_close`) where given, else their values (:func:`assert_tensor_close`)."""
    assert set(single[part]) == set(other[part])
    for key, value in single[part].items():
        if start is None:
            assert_tensor_close(other[part][key], value, f"{part} {key}")
        else:
            assert_change_close(other[part][key], value, warm_value(start, key), f"{part} {key}")


@pytest.mark.parametrize(
    "name", [name for name in CONFIGS if not name.startswith("control") and name not in MIXED_PRECISION and name not in ACCUMULATED]
)
def test_two_processes_train_what_one_process_trains(parity_runs: dict[int, Path], name: str) -> None:
    single, pair = load_states(parity_runs, name)
    warm = torch.load(parity_runs[1] / "warm_start.pt", weights_only=True)
    for rank, state in enumerate(pair):
        for part in ("student", "teacher"):
            assert_states_close(single, state, part, warm)
        assert_states_close(single, state, "density")  # a fresh estimator: its values
        total = total_change_difference(single, state, warm)
        assert total <= TOTAL_UPDATE_TOLERANCE, f"rank {rank}: the change of the whole network differs by {total:.3g}"
        for index, moments in single["density_adam"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert_tensor_close(state["density_adam"][index][key], moments[key], f"density Adam {index} {key}")
    assert pair[0]["miou"] == pytest.approx(single["miou"], abs=1e-6)
    one, two = metrics(parity_runs, name, 1), metrics(parity_runs, name, 2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert set(a) == set(b)
        for key in a:
            if key != "perturbation_relative_norm":  # a mean of per-process means (README)
                assert b[key] == pytest.approx(a[key], rel=2e-4, abs=2e-5), f"step {a['step']}: {key}"
    if name.startswith("ddfp"):
        assert any("density_nll" in r for r in one) and any("loss_perturbed" in r for r in one)


def test_without_sync_bn_the_batchnorm_statistics_differ_from_one_process(parity_runs: dict[int, Path]) -> None:
    """The control: per-process BatchNorm is not one process's, and the comparison above notices."""
    single, pair = load_states(parity_runs, "control_without_sync_bn")
    with pytest.raises(AssertionError, match="student"):
        assert_states_close(single, pair[0], "student")
    running = [key for key in single["student"] if key.endswith("running_var")]
    differing = []
    for key in running:
        try:
            assert_tensor_close(pair[0]["student"][key], single["student"][key], key)
        except AssertionError:
            differing.append(key)
    assert len(differing) > len(running) // 2, "per-process BatchNorm statistics are not one process's"
    for part in ("student", "teacher"):  # yet every process holds the same model (made identical before saving)
        for key, value in pair[0][part].items():
            assert torch.equal(pair[1][part][key], value), f"{part} {key} differs between the processes"


def relative_differences(actual: dict, expected: dict) -> dict[str, float]:
    """``|actual - expected| / |expected|`` of every floating tensor of the student, teacher and density
    (a tensor whose norm is below 1e-6, a bias that started at zero, is left out)."""
    result = {}
    for part in ("student", "teacher", "density"):
        for key, value in expected[part].items():
            if value.is_floating_point() and float(value.double().norm()) > 1e-6:
                difference = (actual[part][key].double() - value.double()).norm() / value.double().norm()
                result[f"{part} {key}"] = float(difference)
    return result


@pytest.mark.parametrize("name", list(MIXED_PRECISION))
def test_bf16_on_two_processes_differs_from_one_process_less_than_bf16_from_float32(
    parity_runs: dict[int, Path], name: str
) -> None:
    """Under bf16 two processes cannot match one to float32 tolerance: bf16 rounds differently when the
    batch is split. The tolerance is the noise floor measured in the same launch: how far one process's
    bf16 run lies from its float32 twin. Two processes must lie closer to one process's bf16 run than
    that, in median over the tensors and for the loss logged at the last step."""
    single, pair = load_states(parity_runs, name)
    float32, _ = load_states(parity_runs, MIXED_PRECISION[name])
    floor = relative_differences(single, float32)
    splits = [relative_differences(state, single) for state in pair]
    median_floor = float(torch.tensor(list(floor.values())).median())
    print(f"{name}: median relative difference bf16 vs float32 (1 process) {median_floor:.3g}, "
          + ", ".join(f"2 processes (rank {r}) vs 1 {float(torch.tensor(list(s.values())).median()):.3g}" for r, s in enumerate(splits)))
    assert 1e-4 < median_floor < 5e-2, "bf16 rounding moves a 6-step run by about 1e-2 of each tensor's norm"
    for split in splits:
        assert float(torch.tensor(list(split.values())).median()) < median_floor
    one, two = metrics(parity_runs, name, 1), metrics(parity_runs, name, 2)
    reference = metrics(parity_runs, MIXED_PRECISION[name], 1)
    assert abs(two[-1]["loss"] - one[-1]["loss"]) <= abs(reference[-1]["loss"] - one[-1]["loss"]) + 1e-3 * abs(one[-1]["loss"])


def test_ddp_broadcasts_no_buffers_when_sync_bn_makes_them_agree(parity_runs: dict[int, Path]) -> None:
    assert load_states(parity_runs, "ddfp_glow")[1][0]["broadcast_buffers"] is False
    assert load_states(parity_runs, "control_without_sync_bn")[1][0]["broadcast_buffers"] is True


def test_a_run_on_two_processes_prints_no_deprecation_warning(shared_launch: SharedLaunch) -> None:
    """torch's deprecated collectives (``torch.distributed.nn.functional``) print a FutureWarning on every process."""
    texts = [shared_launch.output(name, 2) for name, job in shared_launch.jobs.items() if 2 in job.worlds]
    texts.append(shared_launch.logs[2].read_text())
    for text in texts:
        assert "FutureWarning" not in text and "DeprecationWarning" not in text, text[-3000:]


def test_the_compared_miou_tells_models_apart(parity_runs: dict[int, Path]) -> None:
    """The mIoU the parity compares is informative: the model predicts several classes, and two
    different models (DDFP and the mean teacher after the same steps) score differently."""
    ddfp, _ = load_states(parity_runs, "ddfp_glow")
    mean_teacher, _ = load_states(parity_runs, "mean_teacher")
    scored = [name for name, iou in ddfp["per_class_iou"].items() if iou]
    assert len(scored) >= 2, ddfp["per_class_iou"]
    assert abs(ddfp["miou"] - mean_teacher["miou"]) > 1e-3, (ddfp["miou"], mean_teacher["miou"])


def test_with_a_threshold_the_processes_trust_unequal_pixel_counts_that_sum_to_one_process(
    parity_runs: dict[int, Path]
) -> None:
    """Every loss's denominator (trusted pixels) on 2 processes: unequal between them at some step,
    yet summing to one process's, so the normalisation by the total is what the parity above proves."""
    single, pair = load_states(parity_runs, "ddfp_glow_threshold")
    one, first, second = single["denominators"], pair[0]["denominators"], pair[1]["denominators"]
    assert one and len(first) == len(second) == len(one)
    assert any(a != b for a, b in zip(first, second)), (first, second)
    assert 0 < min(one) and max(one) < max(load_states(parity_runs, "ddfp_glow")[0]["denominators"]), "some untrusted"
    assert [a + b for a, b in zip(first, second)] == one


def test_unimatch_parity_runs_a_perturbation_that_changes_the_loss(parity_runs: dict[int, Path]) -> None:
    """UniMatch's perturbed view is not the clean one (a zero loss would prove nothing), on 2 strong views."""
    records = metrics(parity_runs, "unimatch", 1)
    perturbed = [r["loss_perturbed"] for r in records if "loss_perturbed" in r]
    assert perturbed and min(perturbed) > 1e-2, perturbed
    assert any("loss_unsup" in r for r in records)


def parameters_only(state: dict) -> dict:
    """``state`` with the student's and the teacher's parameters alone (no BatchNorm running statistics)."""
    return {part: {key: value for key, value in state[part].items() if "running_" not in key and "num_batches" not in key}
            for part in ("student", "teacher")}


def running_statistics_differing(single: dict, other: dict) -> list[str]:
    """The student's BatchNorm running statistics that differ beyond float tolerance between two end states."""
    differing = []
    for key, value in single["student"].items():
        if "running_" in key:
            try:
                assert_tensor_close(other["student"][key], value, key)
            except AssertionError:
                differing.append(key)
    return differing


def test_one_process_accumulating_two_micro_batches_trains_what_two_processes_train(parity_runs: dict[int, Path]) -> None:
    """``train.total_batch_size = 4`` with micro-batches of 2 + 2: 1 process accumulates 2 of them a step, 2
    processes (no ``sync_bn``) take one each. The same images and augmentations reach the same places
    (micro-batch k of process r is process r x K + k of the larger run), each micro-batch's BatchNorm
    normalises it alone as each process's does, each loss is divided by its own pixel count: every
    parameter of the student and the teacher, and every logged value, is the 2 processes'. What differs
    by design: the BatchNorm running statistics move once per micro-batch (README)."""
    single, pair = load_states(parity_runs, "accumulated")
    assert single["batches"] == {"processes": 1, "micro_batch_size": 2, "accumulation_steps": 2, "total_batch_size": 4}
    assert pair[0]["batches"] == {"processes": 2, "micro_batch_size": 2, "accumulation_steps": 1, "total_batch_size": 4}
    warm = torch.load(parity_runs[1] / "warm_start.pt", weights_only=True)
    accumulated, processes = parameters_only(single), parameters_only(pair[0])
    for part in ("student", "teacher"):
        assert_states_close(accumulated, processes, part, warm)
    total = total_change_difference(accumulated, processes, warm)
    assert total <= TOTAL_UPDATE_TOLERANCE, f"the change of the whole network differs by {total:.3g}"
    one, two = metrics(parity_runs, "accumulated", 1), metrics(parity_runs, "accumulated", 2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    assert all("loss_unsup" in r for r in one if r["step"] > 2), "the semi-supervised steps are compared"
    for a, b in zip(one, two):
        assert set(a) == set(b)
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=2e-5), f"step {a['step']}: {key}"
    running = [key for key in single["student"] if "running_" in key]
    assert len(running_statistics_differing(single, pair[0])) > len(running) // 2, "running statistics: K moves, not one"


SYNC_BN_ACCUMULATION_BOUND = 2.0
"""With ``sync_bn``, 2 processes normalise over 4 images, 1 process accumulating over each micro-batch's 2:
how far apart that trains the parity recipe in 6 steps (the whole network's change, relative to its
norm), measured 1.10: BatchNorm over 2 crops of 32 pixels is far from BatchNorm over 4. The README's
table measures it at real crops (``benchmarks/accumulation_batchnorm.py``)."""


def test_with_sync_bn_accumulation_normalises_each_micro_batch_alone(parity_runs: dict[int, Path]) -> None:
    """2 processes with ``sync_bn`` normalise the step's 4 images together; 1 process accumulating 2
    micro-batches cannot (it holds one at a time): its parameters are the run without ``sync_bn``'s,
    bit for bit (one process has nothing to synchronise), and lie within the stated bound of 2 processes'."""
    single, pair = load_states(parity_runs, "accumulated_sync_bn")
    alone, _ = load_states(parity_runs, "accumulated")
    for part in ("student", "teacher"):
        for key, value in single[part].items():
            assert torch.equal(alone[part][key], value), f"{part} {key}"
    warm = torch.load(parity_runs[1] / "warm_start.pt", weights_only=True)
    total = total_change_difference(parameters_only(pair[0]), parameters_only(single), warm)
    assert 1e-2 < total <= SYNC_BN_ACCUMULATION_BOUND, f"whole-network change differs by {total:.3g}"
