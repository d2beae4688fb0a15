"""The command line, run as a user runs it: exit codes, one-line errors, printed tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


COMMANDS = ["run", "eval", "plugins", "bench", "plan", "recipe", "compare", "ablate", "plot", "predict", "probe"]


def test_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "Usage: sandbox" in out
    for command in COMMANDS:
        assert f" {command} " in out, command


@pytest.mark.parametrize("command", [[name] for name in COMMANDS if name != "recipe"] + [["recipe", "show"]], ids=" ".join)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli([*command, "--help"], capsys)
    assert code == 0 and f"Usage: sandbox {' '.join(command)}" in out and not err


def test_bracketed_words_are_printed_as_written(capsys: pytest.CaptureFixture) -> None:
    """Rich markup took ``[backbone]`` for a tag and printed "on the recipe's ."."""
    code, out, _ = run_cli(["plugins"], capsys)
    assert code == 0 and "on the recipe's [backbone]" in " ".join(out.replace("│", " ").split())


def test_plugins_lists_builtins(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["plugins"], capsys)
    assert code == 0
    for name in ("ddfp", "dropout", "none", "glow", "timm", "shapes", "ce"):
        assert f" {name} " in out, name
    assert "sandbox-ssl" in out


def test_recipe_show_prints_resolved_toml(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["recipe", "show", str(tiny_recipe), "--set", "perturbation.eps=2.5"], capsys)
    assert code == 0
    assert "eps = 2.5" in out and "[consistency.strong]" in out


def test_user_error_is_one_line_with_exit_2(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["recipe", "show", str(tiny_recipe), "--set", "train.bogus=1"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "unknown key 'train.bogus'" in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tiny_recipe: Path) -> None:
    from sandbox.errors import SandboxError

    with pytest.raises(SandboxError):
        main(["--debug", "recipe", "show", str(tiny_recipe), "--set", "train.bogus=1"])


def test_eval_prints_per_class_iou(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = ["--set", "train.iters=2", "--set", "train.warmup_iters=2"]
    assert run_cli(["run", str(tiny_recipe), *overrides], capsys)[0] == 0
    best = tiny_recipe.parent / "runs" / "tiny" / "seed3" / "best.pt"
    code, out, _ = run_cli(["eval", str(tiny_recipe), "--checkpoint", str(best), *overrides], capsys)
    assert code == 0
    for name in ("background", "disc", "square", "triangle", "ring", "mIoU"):
        assert name in out


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["eval", str(tiny_recipe), "--checkpoint", "nope.pt"], capsys)
    assert code == 2 and "checkpoint nope.pt does not exist" in err


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "sandbox", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "run" in result.stdout and "plugins" in result.stdout


def test_bench_prints_step_times_for_the_perturbation_and_none(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["bench", str(tiny_recipe), "--steps", "2", "--warmup", "0"], capsys)
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 2 and "ddfp" in rows[0] and " none " in rows[1]
    assert "GFLOPs/image" in out and "x none" in out
    assert rows[-1].rstrip(" │").endswith("1.00")


def test_bench_times_the_training_loops_own_iteration(
    tiny_recipe: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox.train.iteration import TrainingIteration

    calls: list[tuple[int, bool]] = []
    real = TrainingIteration.__call__

    def counting(self, step, labeled, unlabeled, partners=None):  # noqa: ANN001, ANN202
        calls.append((step, unlabeled is not None))
        return real(self, step, labeled, unlabeled, partners)

    monkeypatch.setattr(TrainingIteration, "__call__", counting)
    code, _, _ = run_cli(["bench", str(tiny_recipe), "--steps", "2", "--warmup", "1"], capsys)
    assert code == 0
    assert calls == [(0, True), (1, True), (2, True)] * 2, "3 semi-supervised iterations for ddfp, then for none"


def test_bench_data_prints_samples_per_second(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["bench", str(tiny_recipe), "--data", "--workers", "0", "--batches", "2"], capsys)
    assert code == 0
    for view in ("labeled (weak)", "unlabeled (weak + strong)", "val"):
        assert view in out


RAISING_PLUGIN = Path(__file__).with_name("raising_perturbation.py")


def test_the_saved_recipe_names_the_plugin_files_so_it_reproduces_the_run(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--plugin FILE`` lands in ``recipe.toml`` by absolute path: the run's recipe needs no ``--plugin``."""
    import shutil
    import tomllib

    shutil.copy(RAISING_PLUGIN, tmp_path / "identity_plugin.py")
    monkeypatch.chdir(tmp_path)
    short = ["--set", "train.iters=3", "--set", "train.eval_every=3", "--set", "perturbation.name=raise_on_call",
             "--set", "perturbation.call=99"]  # never raises: an identity perturbation
    code, _, err = run_cli(["run", str(tiny_recipe), "--plugin", "identity_plugin.py", *short], capsys)
    assert code in (0, None), err
    run_dir = tmp_path / "runs" / "tiny" / "seed3"
    saved = tomllib.loads((run_dir / "recipe.toml").read_text())
    assert saved["plugins"] == [str(tmp_path / "identity_plugin.py")]
    monkeypatch.chdir(tmp_path.parent)  # elsewhere: the relative --plugin path would no longer resolve
    sys.modules.pop("identity_plugin", None)
    code, out, err = run_cli(["eval", str(run_dir / "recipe.toml"), "--checkpoint", str(run_dir / "best.pt")], capsys)
    assert code in (0, None) and "mIoU" in out, err
    code, _, err = run_cli(["run", str(run_dir / "recipe.toml"), "--set", "name=again"], capsys)
    assert code in (0, None), err
    sys.modules.pop("identity_plugin", None)


def test_a_recipes_plugin_file_is_found_beside_the_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """As ``base``, a recipe's ``plugins`` paths are relative to the recipe's folder, not the working directory."""
    import shutil

    (tmp_path / "recipes" / "mine").mkdir(parents=True)
    shutil.copy(RAISING_PLUGIN, tmp_path / "recipes" / "mine" / "beside_plugin.py")
    recipe = tmp_path / "recipes" / "r.toml"
    recipe.write_text('plugins = ["mine/beside_plugin.py"]\n[dataset]\nname = "shapes"\n[perturbation]\nname = "raise_on_call"\n')
    code, out, err = run_cli(["recipe", "show", str(recipe)], capsys)
    sys.modules.pop("beside_plugin", None)
    assert code in (0, None), err
    assert str(tmp_path / "recipes" / "mine" / "beside_plugin.py") in out
