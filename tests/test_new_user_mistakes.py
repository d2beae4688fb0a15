"""A new user's mistakes: each is one ``error:`` line naming the culprit, exit status 2, no traceback,
and nothing written that would mislead (see ``test_errors.py`` for the older catalogue)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sandbox.cli import main
from sandbox.plugins import load_registry
from sandbox.recipe import load_recipe, resolve_components


def fails(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one error line of ``sandbox ARGS``, which must exit with status 2 and print no traceback."""
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    finally:
        sys.modules.pop("bad_plugin", None)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def weights_file(tmp_path: Path, tiny_recipe: Path) -> Path:
    """A ``best.pt``-style file of the tiny recipe's model (5 classes, as ``shapes``)."""
    from sandbox.train.builder import build_model

    recipe = resolve_components(load_recipe(tiny_recipe, []), load_registry())
    path = tmp_path / "best.pt"
    torch.save({"model": build_model(recipe, load_registry(), 5).state_dict(), "step": 0}, path)
    return path


# -- usage mistakes the parser catches: the same `error:` line as every other error -------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["recipe", "show"], "error: missing argument 'recipe'; see 'sandbox recipe show --help'"),
        (["recipe", "show", "r.toml", "--bogus"], "error: no such option: --bogus; see 'sandbox recipe show --help'"),
        (["compare", "runs", "--format", "yaml"], "error: invalid value for '--format': 'yaml' is not one of 'table',"),
        (["plot", "runs", "--images", "-1"], "error: invalid value for '--images'"),
        (["frobnicate"], "error: no such command 'frobnicate'; see 'sandbox --help'"),
    ],
)
def test_a_usage_mistake_is_one_lower_case_error_line(args: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    assert fails(args, capsys).startswith(expected)


def test_a_bad_environment_default_is_a_usage_error_line(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("SANDBOX_CLAIM_TIMEOUT", "soon")
    assert "invalid value for '--claim-timeout' (env var: 'SANDBOX_CLAIM_TIMEOUT')" in fails(["run", str(tiny_recipe)], capsys)
    assert not (tiny_recipe.parent / "runs").exists()


def test_help_and_no_arguments_still_print_the_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0 and "Usage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "Usage" in captured.out + captured.err and "error:" not in captured.err


# -- recipe values that were accepted, or crashed, before ----------------------------------------------


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("seed=-1", "seed = -1: input should be greater than or equal to 0"),
        ("seed=4294967296", "seed = 4294967296: input should be less than or equal to 4294967295"),
        ("perturbation.eps=inf", "perturbation.eps = inf: expected a finite number"),
        ("perturbation.eps=nan", "perturbation.eps = nan: expected a finite number"),
        ("train.lr=inf", "train.lr = inf: input should be a finite number"),
        ("train.scale_range=[2.0, 1.0]", "train.scale_range = [2.0, 1.0]: expected [min, max] scale factors with 0 < min <= max"),
        ("train.scale_range=[-1.0, 2.0]", "train.scale_range = [-1.0, 2.0]: expected [min, max]"),
        ("eval.stride=40", "eval.stride (40) > train.crop_size (32): sliding windows that far apart leave the pixels"),
        ("name=../../elsewhere", "name = '../../elsewhere': expected a run name inside output_dir"),
        ("name=/tmp/x", "name = '/tmp/x': expected a run name inside output_dir"),
        ("name=", "name = '': expected a run name inside output_dir"),
    ],
)
def test_a_recipe_value_out_of_its_domain_is_named(
    setting: str, expected: str, tiny_recipe: Path, capsys: pytest.CaptureFixture
) -> None:
    assert expected in fails(["recipe", "show", str(tiny_recipe), "--set", setting], capsys)


def test_a_negative_seed_in_a_sweep_stops_before_any_run(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = fails(["ablate", str(tiny_recipe), "--grid", "perturbation.name=none", "--seeds", "0,-1",
                  "--output", str(tmp_path / "sweep")], capsys)
    assert line == "error: --seeds '0,-1': seed -1 is out of range; expected integers from 0 to 4294967295"
    assert not (tmp_path / "sweep").exists()


# -- plugins whose hooks would never be called ----------------------------------------------------------


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from sandbox.api import hookimpl\n@hookimpl\ndef sandbox_register_perturbation(register):\n    pass\n",
         "plugin {file}: sandbox_register_perturbation is no sandbox hook; the hooks are: sandbox_register_backbones,"),
        ("def sandbox_register_perturbations(register):\n    pass\n",
         "plugin {file}: sandbox_register_perturbations is not marked @hookimpl (from sandbox.api)"),
    ],
)
def test_a_plugin_hook_that_would_never_be_called_is_an_error(
    source: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plugin = tmp_path / "bad_plugin.py"
    plugin.write_text(source)
    assert expected.format(file=plugin) in fails(["plugins", "--plugin", str(plugin)], capsys)


# -- files ----------------------------------------------------------------------------------------------


def test_a_truncated_checkpoint_is_called_truncated(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    whole = weights_file(tmp_path, tiny_recipe).read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    line = fails(["eval", str(tiny_recipe), "--checkpoint", str(tmp_path / "cut.pt")], capsys)
    assert "cut.pt could not be read: the file is truncated or damaged" in line


def test_predict_of_a_non_image_leaves_no_output_folder(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.png").write_text("not an image\n")
    checkpoint = weights_file(tmp_path, tiny_recipe)
    line = fails(["predict", str(tiny_recipe), str(tmp_path / "notes.png"), "--checkpoint", str(checkpoint),
                  "--out", str(tmp_path / "predicted")], capsys)
    assert "notes.png could not be read" in line
    assert not (tmp_path / "predicted").exists()


# -- mistakes that were already one line (kept so) -----------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--set", "=5"], "--set '=5': expected KEY=VALUE"),
        (["--set", "model.aspp_dilations=6,12,18"], "aspp_dilations = '6,12,18': input should be a valid list"),
        (["--set", "train.scale_range=[0.5]"], "missing key 'train.scale_range.1'"),
        (["--set", 'plugins="mine.py"'], "plugins = 'mine.py': input should be a valid list"),
        (["--set", "train=5"], "train = 5: input should be a valid dictionary"),
    ],
)
def test_recipe_show_mistakes_stay_one_line(
    extra: list[str], expected: str, tiny_recipe: Path, capsys: pytest.CaptureFixture
) -> None:
    assert expected in fails(["recipe", "show", str(tiny_recipe), *extra], capsys)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--seeds", "0,a"], "--seeds '0,a': expected comma-separated integers"),
        (["--seeds", "0,,1"], "--seeds '0,,1': expected comma-separated integers"),
        (["--shard", "x"], "--shard x: expected K/N"),
        (["--grid", "perturbation.eps"], "--grid 'perturbation.eps': expected KEY=VALUE1,VALUE2"),
    ],
)
def test_sweep_option_mistakes_stay_one_line(
    args: list[str], expected: str, tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    grid = [] if "--grid" in args else ["--grid", "perturbation.name=none"]
    assert expected in fails(["ablate", str(tiny_recipe), *grid, *args, "--output", str(tmp_path / "sweep"), "--list"], capsys)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("command", ["compare", "plot"])
def test_a_folder_without_runs_stays_one_line(command: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("no runs here\n")
    assert f"{tmp_path} holds no run directory" in fails([command, str(tmp_path)], capsys)


def folder_of_ignored_masks(root: Path, count: int = 6) -> Path:
    """``root/images`` and ``root/masks`` of ``count`` 8x8 images whose masks are all 255 (no label)."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for number in range(count):
        Image.fromarray(np.full((8, 8, 3), 40 * number, dtype=np.uint8)).save(root / "images" / f"i{number}.png")
        Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(root / "masks" / f"i{number}.png")
    return root


def test_a_folder_dataset_whose_masks_are_all_ignore_stops_before_training(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """It trained "successfully" (exit 0, a loss of 0 at every step, best mIoU '-', val_miou NaN)."""
    data = folder_of_ignored_masks(tmp_path / "data")
    dataset = ["dataset.name=folder", f"dataset.root={data}", 'dataset.class_names=["bg", "cat"]', "dataset.labeled=2"]
    line = fails(["run", str(tiny_recipe), *(arg for value in dataset for arg in ("--set", value))], capsys)
    assert f"dataset folder {data}: none of the 2 labeled masks (in {data / 'masks'}) holds a labeled pixel" in line
    assert "expected pixels with class ids 0..1" in line
    assert not (tmp_path / "runs").exists(), "nothing trained, nothing written"


def strict_json(text: str) -> object:
    """``text`` parsed as strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` are refused."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_every_json_a_run_writes_is_strict_json(trained_tiny_run: Path, tmp_path: Path) -> None:
    """A val mIoU of nothing scored was written as ``NaN`` (not JSON: strict parsers refuse the file); now null."""
    from sandbox.analysis.curves import read_metrics, series
    from sandbox.analysis.runs import read_run
    from sandbox.rundir.directory import RunDirectory

    files = sorted(trained_tiny_run.rglob("*.json"))
    assert trained_tiny_run / "summary.json" in files
    for path in files:
        strict_json(path.read_text())
    for line in (trained_tiny_run / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.path.mkdir()
    nan, inf = float("nan"), float("inf")
    run_dir.append_metrics({"step": 1, "loss": 0.0, "perturbation_relative_norm": inf})
    run_dir.append_metrics({"step": 1, "val_miou": nan, "val_per_class_iou": {"bg": nan, "cat": 0.5}})
    run_dir.write_summary({"best_miou": nan, "final_miou": -inf, "best_step": None})
    records = [strict_json(line) for line in run_dir.metrics_file.read_text().splitlines()]
    assert records == [
        {"step": 1, "loss": 0.0, "perturbation_relative_norm": None},
        {"step": 1, "val_miou": None, "val_per_class_iou": {"bg": None, "cat": 0.5}},
    ]
    assert strict_json(run_dir.summary_file.read_text()) == {"best_miou": None, "final_miou": None, "best_step": None}
    assert series(read_metrics(run_dir.path)) == {"loss": ([1], [0.0]), "val_per_class_iou.cat": ([1], [0.5])}
    assert read_run(run_dir.path).summary == {"best_miou": None, "final_miou": None, "best_step": None}


def test_training_prints_the_split_sizes_it_uses(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    """Nothing said how many labeled, unlabeled and val images a run used."""
    from sandbox.train.builder import build_dataset, build_train_views

    registry = load_registry()
    recipe = resolve_components(load_recipe(tiny_recipe), registry)
    source = build_dataset(recipe, registry)
    capsys.readouterr()
    build_train_views(source, recipe)
    assert capsys.readouterr().err == "data: [dataset] 'shapes': 8 labeled, 16 unlabeled, 4 val images\n"
    build_train_views(source, recipe, announce=False)
    assert capsys.readouterr().err == ""


def test_overwrite_leaves_a_folder_that_holds_no_run_whole(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--overwrite`` replaces a run, nothing else: at the run's place, a folder of the user's own (here
    reached through a link) is left whole, with one line (exit 2). Before, every file in it was deleted."""
    own = tmp_path / "thesis"
    own.mkdir()
    (own / "thesis.txt").write_text("years of work")
    run = tmp_path / "runs" / "tiny" / "seed3"
    run.parent.mkdir(parents=True)
    run.symlink_to(own)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--overwrite"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "holds files but no run (no recipe.toml)" in errors[0], err
    assert sorted(p.name for p in own.iterdir()) == ["thesis.txt"] and (own / "thesis.txt").read_text() == "years of work"


def test_a_plugin_file_named_like_a_module_in_use_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A ``--plugin json.py`` replaced the standard library's ``json`` for the whole process (the run then
    failed with an error naming no plugin, and left a run folder behind); now one line naming the module."""
    plugin = tmp_path / "json.py"
    plugin.write_text("from sandbox.api import hookimpl\n\n@hookimpl\ndef sandbox_register_perturbations(register):\n    pass\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["plugins", "--plugin", str(plugin)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: plugin file {plugin} has the name of the module 'json' ("), err
    assert json.dumps({"intact": True}) == '{"intact": true}' and sys.modules["json"].__file__ != str(plugin)
