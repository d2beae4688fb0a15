"""A new user's mistakes: each is one ``error:`` line naming the culprit, exit status 2, no traceback,
and nothing written that would mislead (see ``test_errors.py`` for the older catalogue)."""

from __future__ import annotations

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
