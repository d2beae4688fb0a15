"""``sandbox probe`` on a tiny trained DDFP run: figures, their consistency, grids and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from sandbox.analysis.probe import (
    PerturbationFigures,
    Spread,
    ViewFigures,
    equal_norm_noise,
    fraction,
    pixel_norms,
    relative_norms,
    spread,
)
from sandbox.cli import main

SCALE_PLUGIN = '''
from sandbox.api import Perturbation, hookimpl


class Scale(Perturbation):
    """Multiply the features by 1 + s: a step of relative norm exactly s at every pixel."""

    def __init__(self, s: float = 0.5) -> None:
        super().__init__()
        self.s = s

    def forward(self, features, context):
        return features * (1.0 + self.s)


@hookimpl
def sandbox_register_perturbations(register) -> None:
    register("probe_scale", Scale)
'''


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DDFP run of 4 steps (2 of them semi-supervised) with a checkpoint holding the estimator."""
    from conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("probe")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(output_dir=(folder / "runs").as_posix()))
    sets = ["train.iters=4", "train.eval_every=4", "train.checkpoint_every=4", "train.threads=1"]
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(recipe), *[arg for value in sets for arg in ("--set", value)]])
    assert exit_info.value.code == 0
    (folder / "scale_plugin.py").write_text(SCALE_PLUGIN)
    return folder / "runs" / "tiny" / "seed3"


def by_name(document: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in document["perturbations"]}


def assert_same_spread(first: dict, second: dict) -> None:
    for key in ("median", "p10", "p90"):
        assert first[key] == pytest.approx(second[key], rel=1e-4, abs=1e-6)


def test_probe_json_figures_are_consistent(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plugin = trained_run.parents[2] / "scale_plugin.py"
    out = tmp_path / "probe"
    args = ["probe", str(trained_run), "--images", "3", "--format", "json", "--out", str(out), "--plugin", str(plugin)]
    names = ["--perturbation", "ddfp", "--perturbation", "none", "--perturbation", "probe_scale"]
    code, stdout, stderr = run_cli([*args, *names], capsys)
    assert code == 0, stderr
    document = json.loads(stdout)  # nothing but the document on stdout
    assert document["images"] == 3 and document["density"] is True and "checkpoints" in document["weights"]
    results = by_name(document)
    assert list(results) == ["ddfp", "none", "probe_scale"]

    for entry in results.values():
        assert 0.0 <= entry["trusted_fraction"] <= 1.0
        assert entry["trusted_fraction"] == results["ddfp"]["trusted_fraction"]  # the same crops, the same teacher
        for view in ("step", "noise"):
            assert 0.0 <= entry[view]["flipped_fraction"] <= 1.0
        # noise of equal per-pixel norm moves the features exactly as far as the step
        assert_same_spread(entry["step"]["relative_norm"], entry["noise"]["relative_norm"])
        assert entry["step"]["density_before"] == entry["noise"]["density_before"]
        assert Path(entry["figure"]).is_file() and Path(entry["figure"]).parent == out
        with Image.open(entry["figure"]) as picture:
            assert picture.width > 500 and picture.height > 300

    ddfp = results["ddfp"]
    assert ddfp["perturbed_view"] is True and ddfp["options"] == {"eps": 4.0, "norm": "l2"}
    assert ddfp["step"]["relative_norm"]["median"] > 0
    # the step descends the estimator's density, far more than noise of the same size does
    assert ddfp["step"]["density_change"] < ddfp["noise"]["density_change"]
    assert ddfp["step"]["density_change"] < 0

    none = results["none"]
    assert none["perturbed_view"] is False
    for view in ("step", "noise"):
        assert none[view]["relative_norm"] == {"median": 0.0, "p10": 0.0, "p90": 0.0}
        assert none[view]["flipped_fraction"] == 0.0
        assert none[view]["density_change"] == pytest.approx(0.0, abs=1e-9)

    scale = results["probe_scale"]["step"]["relative_norm"]  # features * 1.5: relative norm 0.5 at every pixel
    assert scale == pytest.approx({"median": 0.5, "p10": 0.5, "p90": 0.5}, abs=1e-4)
    assert results["probe_scale"]["perturbed_view"] is True


def test_probe_default_is_the_runs_perturbation_and_deterministic(trained_run: Path, capsys: pytest.CaptureFixture) -> None:
    first = json.loads(run_cli(["probe", str(trained_run), "--images", "2", "--format", "json"], capsys)[1])
    second = json.loads(run_cli(["probe", str(trained_run / "recipe.toml"), "--images", "2", "--format", "json"], capsys)[1])
    assert [entry["name"] for entry in first["perturbations"]] == ["ddfp"]  # (the run's recipe.toml names the run too)
    assert first == second
    assert (trained_run / "probe" / "ddfp.png").is_file()  # default --out: probe/ inside the run


def test_encoder_perturbation_and_markdown(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["probe", str(trained_run), "--images", "2", "--format", "md", "--out", str(tmp_path)]
    code, stdout, stderr = run_cli([*args, "--perturbation", "dropout", "--perturb-at", "encoder"], capsys)
    assert code == 0, stderr
    assert "| perturbation | view |" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| dropout | step |")]
    assert len(rows) == 1 and float(rows[0].split("|")[3].split()[0]) > 0  # the encoder's maps moved the features
    assert (tmp_path / "dropout-encoder.png").is_file()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--perturbation", "no_such_thing"], "unknown perturbation"),
        (["--perturbation", "ddfp", "--perturb-at", "encoder"], "--perturb-at classifier"),
        (["--perturb-at", "decoder"], "--perturb-at 'decoder'"),
    ],
)
def test_errors_are_one_line(trained_run: Path, capsys: pytest.CaptureFixture, extra: list[str], expected: str) -> None:
    code, stdout, stderr = run_cli(["probe", str(trained_run), "--images", "1", *extra], capsys)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and expected in stderr and stderr.startswith("error: ")


def test_missing_run_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, stderr = run_cli(["probe", str(tmp_path / "absent")], capsys)
    assert code == 2 and "recipe.toml" in stderr and len(stderr.strip().splitlines()) == 1


def test_relative_norms_and_equal_norm_noise() -> None:
    features = torch.zeros(1, 2, 1, 3)
    features[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # norm 5
    features[0, :, 0, 1] = torch.tensor([1.0, 0.0])  # norm 1; pixel 2 is dead (all zeros)
    perturbed = features.clone()
    perturbed[0, 0, 0, 0] += 1.0
    perturbed[0, 1, 0, 1] += 2.0
    everywhere = torch.ones(1, 1, 3, dtype=torch.bool)
    assert relative_norms(features, perturbed, everywhere).tolist() == pytest.approx([0.2, 2.0])
    assert relative_norms(features, perturbed, torch.tensor([[[False, True, True]]])).tolist() == pytest.approx([2.0])
    noisy = equal_norm_noise(features, perturbed, torch.Generator().manual_seed(0))
    assert pixel_norms(noisy - features)[0, 0].tolist() == pytest.approx([1.0, 2.0, 0.0], abs=1e-6)
    assert not torch.allclose(noisy, perturbed)


def test_summaries_of_nothing_are_nan_and_json_null() -> None:
    assert math.isnan(spread(torch.empty(0)).median)
    assert spread(torch.tensor([1.0, 2.0, 3.0])) == Spread(median=2.0, p10=pytest.approx(1.2), p90=pytest.approx(2.8))
    nothing = torch.zeros(2, 2, dtype=torch.bool)
    assert math.isnan(fraction(nothing, nothing))
    empty = ViewFigures(spread(torch.empty(0)), math.nan)
    data = PerturbationFigures("x", True, math.nan, empty, empty).to_json()
    assert data["trusted_fraction"] is None and data["step"]["relative_norm"]["median"] is None
    assert data["step"]["density_change"] is None
    json.dumps(data, allow_nan=False)


def test_probe_is_listed_and_has_help(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and " probe " in out
    code, out, err = run_cli(["probe", "--help"], capsys)
    assert code == 0 and "Usage: sandbox probe" in out and "--perturbation" in out and not err


def test_out_under_a_file_is_one_line_error(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["probe", str(trained_run), "--images", "1", "--perturbation", "none", "--out", str(blocker / "x")]
    code, _, stderr = run_cli(args, capsys)
    assert code == 2 and stderr.startswith("error: --out ") and len(stderr.strip().splitlines()) == 1


def test_text_table_keeps_brackets(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["probe", str(trained_run), "--images", "1", "--perturbation", "none", "--out", str(tmp_path)]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert "rel. norm median [p10, p90]" in stdout  # not taken for rich markup
    assert "0.000 [0.000, 0.000]" in stdout and f"none: grid -> {tmp_path / 'none.png'}" in stdout


def test_run_without_checkpoints_falls_back_to_best_weights(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """best.pt serves as student and teacher; there is no trained estimator, so no density figures, and ddfp is refused."""
    from sandbox.plugins import load_registry
    from sandbox.recipe import load_recipe, resolve_components
    from sandbox.train.builder import build_dataset, build_model

    registry = load_registry()
    recipe = resolve_components(load_recipe(tiny_recipe), registry)
    run = tmp_path / "fabricated"
    run.mkdir()
    (run / "recipe.toml").write_text(recipe.to_toml())
    torch.save({"model": build_model(recipe, registry, build_dataset(recipe, registry).num_classes).state_dict()}, run / "best.pt")
    code, stdout, stderr = run_cli(["probe", str(run), "--images", "1", "--perturbation", "dropout", "--format", "json"], capsys)
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["weights"].endswith("best.pt") and document["density"] is False
    assert document["perturbations"][0]["step"]["density_change"] is None
    code, _, stderr = run_cli(["probe", str(run), "--images", "1"], capsys)  # the run's own ddfp
    assert code == 2 and "has no trained one" in stderr and len(stderr.strip().splitlines()) == 1


def test_the_checkpointed_objects_are_found_by_name(trained_run: Path) -> None:
    """The teacher's file of the newest checkpoint is the evaluated teacher of ``last.pt`` (same step)."""
    from sandbox.analysis.probe_models import newest_checkpoint, read_state
    from sandbox.rundir.directory import checkpointed_file

    folder = newest_checkpoint(trained_run)
    assert folder is not None and folder.name == "step_00000004"
    teacher, last = read_state(checkpointed_file(folder, "teacher")), torch.load(trained_run / "last.pt", weights_only=True)
    assert last["step"] == 4 and set(teacher) == set(last["model"])
    assert all(torch.equal(teacher[key], last["model"][key]) for key in teacher)
    density = read_state(checkpointed_file(folder, "density"))
    assert isinstance(density, dict) and not set(density) & set(teacher)


def test_more_images_than_the_run_holds_are_clamped_with_a_note_and_progress_is_shown(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--images 100000`` on 16 unlabeled images probed 100000 crops for minutes without a word; now the 16
    images, with a note, and progress lines on stderr when a phase runs long (here: always)."""
    monkeypatch.setattr("sandbox.cli.probe.PROGRESS_EVERY_S", 0.0, raising=False)
    args = ["probe", str(trained_run), "--images", "40", "--perturbation", "none", "--format", "json", "--out", str(tmp_path)]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(stdout, parse_constant=refuse)["images"] == 16, "strict JSON, of the 16 images"
    lines = stderr.splitlines()
    assert lines[0] == "note: --images 40: the run's unlabeled set holds only 16 images; probing those 16"
    reading = [line.rsplit(" (", 1)[0] for line in lines if line.startswith("probe: reading")]
    probing = [line.rsplit(" (", 1)[0] for line in lines if line.startswith("probe: none")]
    assert reading == [f"probe: reading {done}/16 crops" for done in range(1, 17)]
    assert probing == [f"probe: none {done}/16 crops" for done in range(2, 17, 2)], "after each batch of 2"
    assert len(lines) == 1 + 16 + 8
