"""End-to-end runs of the one training code path on tiny data (CPU, a few iterations)."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from run_records import assert_same_records, records
from sandbox.cli import main
from sandbox.plugins import load_registry
from sandbox.recipe import load_recipe, resolve_components
from sandbox.train.builder import build_method, build_model, unused_tables
from sandbox.train.loop import Trainer
from sandbox.recipe import differing_keys, recipe_difference
from sandbox.rundir.directory import RunDirectory
from sandbox.train.student_pass import network_of


def cli(*args: str) -> None:
    """Run the sandbox CLI in this process; it must succeed."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 0


def run_dir_of(recipe_path: Path, *overrides: str) -> Path:
    recipe = load_recipe(recipe_path, list(overrides))
    return RunDirectory.for_recipe(recipe).path


def test_ddfp_run_trains_model_and_flow_and_writes_every_output(tiny_recipe: Path) -> None:
    recipe = resolve_components(load_recipe(tiny_recipe), load_registry())
    registry = load_registry()
    run_dir = RunDirectory.for_recipe(recipe)
    trainer = Trainer(recipe, registry, run_dir)
    run_dir.prepare(recipe, resume=False, overwrite=False)
    model = network_of(trainer.accelerator.unwrap_model(trainer.model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flow_before = {k: v.clone() for k, v in trainer.method.density.state_dict().items()}
    summary = trainer.train()

    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("classifier.") for k in changed)
    aux = [k for k in changed if ".auxiliary." in k]
    assert aux, "the perturbed view must train the auxiliary BatchNorms"
    flow_changed = [k for k, v in trainer.method.density.state_dict().items() if not torch.equal(v, flow_before[k])]
    assert flow_changed, "the density estimator must be trained online"

    path = run_dir.path
    for name in ("recipe.toml", "metrics.jsonl", "summary.json", "best.pt", "last.pt"):
        assert (path / name).is_file(), name
    assert run_dir.latest_checkpoint() is not None
    logged = records(path)
    train_records = [r for r in logged if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    semi = train_records[-1]
    for key in ("loss_sup", "loss_unsup", "loss_perturbed", "density_nll", "lr", "images_per_s"):
        assert key in semi, key
    assert [r["step"] for r in logged if "val_miou" in r] == [3, 6]
    assert 0.0 <= summary["final_miou"] <= 1.0
    saved = json.loads((path / "summary.json").read_text())
    assert saved["iters"] == 6 and saved["seed"] == 3
    assert set(saved["final_per_class_iou"]) == {"background", "disc", "square", "triangle", "ring"}
    assert saved["versions"]["torch"] == torch.__version__.split("+")[0] or saved["versions"]["torch"]


def test_resume_continues_at_the_checkpoint_and_matches_an_uninterrupted_run(tiny_recipe: Path, trained_tiny_run: Path) -> None:
    first = trained_tiny_run
    assert first == run_dir_of(tiny_recipe)
    reference = records(first)
    reference_weights = torch.load(first / "last.pt", weights_only=True)["model"]

    # Simulate a kill after the step-3 checkpoint: drop what came later, then --resume.
    shutil.rmtree(first / "checkpoints" / "step_00000006")
    (first / "summary.json").unlink()
    (first / "last.pt").unlink()
    cli("run", str(tiny_recipe), "--resume")
    assert_same_records(reference, records(first))
    weights = torch.load(first / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(weights[k].float(), reference_weights[k].float(), atol=1e-5) for k in weights)
    assert json.loads((first / "summary.json").read_text())["iters"] == 6


def test_none_perturbation_switches_off_the_perturbed_view(tiny_recipe: Path) -> None:
    cli("run", str(tiny_recipe), "--set", "perturbation.name=none", "--set", "name=tiny-none")
    logged = records(run_dir_of(tiny_recipe, "name=tiny-none"))
    train = [r for r in logged if "loss" in r]
    assert "loss_unsup" in train[-1]
    assert all("loss_perturbed" not in r and "density_nll" not in r for r in train)
    saved = tomllib.loads((run_dir_of(tiny_recipe, "name=tiny-none") / "recipe.toml").read_text())
    assert "density" not in saved and saved["backbone"]["name"] == "timm", "only the tables the run used"


def test_tables_a_saved_recipe_leaves_out_never_make_a_recipe_differ_from_it(tiny_recipe: Path) -> None:
    none = load_recipe(tiny_recipe, ["perturbation.name=none"])
    saved = none.to_toml(omit={"density"})
    other_density = load_recipe(tiny_recipe, ["perturbation.name=none", "density.name=gmm"])
    assert other_density.as_saved_in(saved) == saved and differing_keys(saved, other_density) == "formatting"
    assert differing_keys(saved, load_recipe(tiny_recipe, ["perturbation.name=none", "train.iters=7"])) == "train.iters"
    full = none.to_toml()
    assert "perturbation.name" in differing_keys(full, load_recipe(tiny_recipe)), "a saved table still counts"
    older = "\n".join(line for line in full.splitlines() if not line.startswith(("loss_pixel_count", "sync_bn_impl")))
    assert recipe_difference(older, none) == "", "settings added since a run was saved, at their defaults, do not count"
    assert recipe_difference(older, load_recipe(tiny_recipe, ["perturbation.name=none", "train.loss_pixel_count=per_process"])) \
        == "train.loss_pixel_count", "a setting added since counts when it is not at its default"
    assert "density.name" in differing_keys(full, other_density)


def test_the_saved_recipe_of_a_network_without_backbone_has_no_backbone_table(tiny_recipe: Path) -> None:
    registry = load_registry()
    for overrides, expected in (([], {"density"}), (["model.name=smp", "model.encoder=resnet18"], {"backbone", "density"})):
        recipe = resolve_components(load_recipe(tiny_recipe, [*overrides, "perturbation.name=none"]), registry)
        used: set[str] = set()
        model = build_model(recipe, registry, 5, used)
        method = build_method(recipe, registry, 5, model.embedding_channels)
        assert unused_tables(used, method) == expected, overrides
    ddfp = resolve_components(load_recipe(tiny_recipe), registry)
    assert unused_tables({"backbone"}, build_method(ddfp, registry, 5, 16)) == set()


def test_a_third_party_perturbation_from_a_module_is_used_by_a_run(tiny_recipe: Path, tmp_path: Path) -> None:
    plugin = tmp_path / "counting_perturbation.py"
    calls = tmp_path / "calls.txt"
    plugin.write_text(f'''
from sandbox.api import Perturbation, hookimpl

class Counting(Perturbation):
    """Identity that records each call."""
    def forward(self, features, context):
        with open({str(calls)!r}, "a") as f:
            f.write("x")
        return features * 1.0

@hookimpl
def sandbox_register_perturbations(register):
    register("counting", Counting)
''')
    cli("run", str(tiny_recipe), "--plugin", str(plugin), "--set", "perturbation.name=counting", "--set", "name=third")
    assert calls.read_text() == "x" * 4  # iterations 2..5 are semi-supervised
    train = [r for r in records(run_dir_of(tiny_recipe, "name=third")) if "loss" in r]
    assert "loss_perturbed" in train[-1]


def test_existing_run_directory_is_not_overwritten(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    cli("run", str(tiny_recipe), "--set", "train.iters=2", "--set", "train.warmup_iters=2")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--set", "train.iters=2", "--set", "train.warmup_iters=2"])
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err


def test_the_saved_recipe_reproduces_the_run(tiny_recipe: Path, tmp_path: Path) -> None:
    """Bit for bit, with deterministic algorithms and data-loader workers (the saved recipe keeps both)."""
    cli("run", str(tiny_recipe), "--set", "perturbation.name=dropout", "--set", "train.deterministic=true",
        "--set", "train.num_workers=2")
    first = run_dir_of(tiny_recipe)
    compute = json.loads((first / "summary.json").read_text())["compute"]
    assert compute["deterministic"] is True and compute["threads"] == torch.get_num_threads() and compute["cpu_capability"]
    saved = first / "recipe.toml"
    cli("run", str(saved), "--set", f"output_dir={(tmp_path / 'again').as_posix()}")
    second = tmp_path / "again" / "tiny" / "seed3"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]
    assert strip(records(first)) == strip(records(second))


def test_a_corrupt_file_found_while_training_is_a_one_line_error(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(12):
        Image.fromarray((torch.rand(24, 24, 3) * 255).byte().numpy()).save(root / "images" / f"{index:02d}.png")
        Image.fromarray((torch.rand(24, 24) * 2).byte().numpy()).save(root / "masks" / f"{index:02d}.png")
    for index in range(12):
        (root / "images" / f"{index:02d}.png").write_bytes(b"not a png")  # every image: the first batch hits one
    overrides = [
        "dataset.name=folder", f"dataset.root={root.as_posix()}", 'dataset.class_names=["a","b"]',
        "dataset.check_files=false", "dataset.labeled=4",
    ]
    args = ["run", str(tiny_recipe)]
    for override in overrides:
        args += ["--set", override]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err[-1].startswith("error: training failed after 0 of 6 steps: while reading training data:") and ".png" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_tensorboard_tracker_from_the_recipe(tiny_recipe: Path) -> None:
    pytest.importorskip("tensorboard")
    cli("run", str(tiny_recipe), "--set", "train.trackers=[\"tensorboard\"]", "--set", "train.iters=2", "--set", "train.warmup_iters=2")
    events = list(run_dir_of(tiny_recipe).rglob("events.out.tfevents.*"))
    assert events, "tensorboard event files are written under the run directory"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"loss", "val_miou"} <= set(accumulator.Tags()["scalars"])


@pytest.mark.parametrize("statistics", ["own", "student"])
def test_teacher_batchnorm_statistics_are_its_own_or_copied_from_the_student(tiny_recipe: Path, statistics: str) -> None:
    registry = load_registry()
    overrides = [f"train.teacher_statistics={statistics}", "perturbation.name=none"]
    recipe = resolve_components(load_recipe(tiny_recipe, overrides), registry)
    run_dir = RunDirectory.for_recipe(recipe)
    trainer = Trainer(recipe, registry, run_dir)
    run_dir.prepare(recipe, resume=False, overwrite=False)
    trainer.train()
    student = network_of(trainer.accelerator.unwrap_model(trainer.model))
    pairs = [(t, s) for (name, t), s in zip(trainer.teacher.named_buffers(), student.buffers()) if name.endswith("running_mean") and ".auxiliary." not in name]  # the auxiliary ones stay unused without a view
    same = [torch.equal(t, s) for t, s in pairs]
    assert all(same) if statistics == "student" else not any(same)


def test_eval_both_scores_student_and_teacher_and_counts_the_better(tiny_recipe: Path) -> None:
    cli("run", str(tiny_recipe), "--set", "eval.model=both", "--set", "perturbation.name=none")
    run_dir = run_dir_of(tiny_recipe)
    evaluations = [r for r in records(run_dir) if "val_miou" in r]
    assert [r["step"] for r in evaluations] == [3, 6], "both after warm-up (2 steps)"
    for record in evaluations:
        assert record["val_miou"] == max(record["val_miou_student"], record["val_miou_teacher"])
        assert record["val_miou"] == record[f"val_miou_{record['val_model']}"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_model"] == evaluations[-1]["val_model"]
    assert summary["best_miou"] == max(r["val_miou"] for r in evaluations)


def test_logged_values_are_means_over_the_steps_that_produced_them(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.train.step import SemiSupervisedStep

    real = SemiSupervisedStep.semi_supervised

    def constant_unsup(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        loss, logs = real(self, *args, **kwargs)
        return loss, {**logs, "loss_unsup": torch.tensor(1.0)}

    monkeypatch.setattr(SemiSupervisedStep, "semi_supervised", constant_unsup)
    cli("run", str(tiny_recipe), "--set", "train.log_every=4", "--set", "train.iters=4")
    window = [r for r in records(run_dir_of(tiny_recipe)) if "loss" in r]
    assert [r["step"] for r in window] == [4], "one window: 2 warm-up steps and 2 semi-supervised ones"
    assert window[0]["loss_unsup"] == pytest.approx(1.0), "a mean over the 2 steps that have it, not over 4"


def test_one_unlabeled_image_per_process_warns_that_cutmix_is_skipped(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    cli("run", str(tiny_recipe), "--set", "train.unlabeled_batch_size=1", "--set", "train.iters=3")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "unlabeled_batch_size = 1" in warnings[0] and "CutMix" in warnings[0]


def test_the_relative_norm_of_a_runaway_perturbation_is_its_true_size_not_infinity() -> None:
    """Squares of features above ~1e19 overflow float32: the norms are taken of scaled vectors."""
    from sandbox.train.step import relative_step

    features = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    trusted = torch.ones(2, 4, 4, dtype=torch.bool)
    for factor in (3.0, 1e20, 1e30):
        assert relative_step(features, features * (1 + factor), trusted).item() == pytest.approx(factor, rel=1e-5)
    huge = features * 1e25
    assert relative_step(huge, huge * 1.5, trusted).item() == pytest.approx(0.5, rel=1e-5)
    features[0, :, 0, 0] = 0.0  # a dead pixel has no relative size: left out, as before
    assert relative_step(features, features + 1.0, trusted).isfinite()


def test_a_logged_value_that_is_not_finite_is_named_once_not_dropped_silently(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from sandbox.train.log_window import left_out_note
    from sandbox.train.step import SemiSupervisedStep

    noted: set[str] = set()
    keys = ["loss", "perturbation_relative_norm", "density_nll"]
    assert left_out_note(keys, {"loss": 1.0}, 8, noted) == (
        "step 8: perturbation_relative_norm not finite (infinite or NaN) in this log window: left out of "
        "metrics.jsonl and the trackers (named once; a later window whose value is not finite leaves it out too)"
    ), "a skipped density update is counted, not named"
    assert left_out_note(keys, {"loss": 1.0}, 10, noted) is None, "once a run"

    real = SemiSupervisedStep.semi_supervised

    def overflowing(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        loss, logs = real(self, *args, **kwargs)
        if "perturbation_relative_norm" in logs:
            logs["perturbation_relative_norm"] = torch.tensor(float("inf"))
        return loss, logs

    monkeypatch.setattr(SemiSupervisedStep, "semi_supervised", overflowing)
    cli("run", str(tiny_recipe), "--set", "train.log_every=4", "--set", "train.iters=4")
    lines = [r for r in records(run_dir_of(tiny_recipe)) if "loss" in r]
    assert [r["step"] for r in lines] == [4] and "perturbation_relative_norm" not in lines[0]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "perturbation_relative_norm" in line]
    assert warnings == ["warning: step 4: perturbation_relative_norm not finite (infinite or NaN) in this log window: "
                        "left out of metrics.jsonl and the trackers (named once; a later window whose value is not "
                        "finite leaves it out too)"]


@pytest.mark.parametrize("returned", [torch.float16, torch.float64, torch.bfloat16])
def test_a_perturbation_of_another_dtype_is_refused_alike(returned: torch.dtype) -> None:
    """float16 and float64 in a float32 run: the same one-line error naming the plugin and both dtypes."""
    from sandbox.errors import PluginError
    from sandbox.train.plugin_calls import check_perturbed

    features = torch.randn(2, 4, 3, 3)
    name = str(returned).removeprefix("torch.")
    with pytest.raises(PluginError) as error:
        check_perturbed("perturbation 'p' (from pkg 1.0)", features, features.to(returned))
    assert str(error.value) == (
        f"perturbation 'p' (from pkg 1.0) returned a tensor (2, 4, 3, 3) {name} on cpu, expected a tensor "
        "(2, 4, 3, 3) float32 on cpu like the features (or None)"
    )


def test_under_autocast_a_perturbation_may_return_float32_or_autocasts_dtype() -> None:
    from sandbox.errors import PluginError
    from sandbox.train.plugin_calls import check_perturbed

    features = torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.bfloat16):
            assert check_perturbed("p", features, features.to(dtype)).dtype == torch.float32
        assert check_perturbed("p", features.bfloat16(), features).dtype == torch.bfloat16
        with pytest.raises(PluginError, match=r"float16 on cpu, expected a tensor \(2, 4, 3, 3\) float32 on cpu "
                                              r"\(or bfloat16 under this run's autocast\)"):
            check_perturbed("p", features, features.half())
