"""``sandbox ablate``: grid expansion, run planning, and a real tiny sweep (skip, resume, restart, failures)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from light_imports import run_without_heavy_imports
from sandbox.rundir.files import FAILED_MARKER
from sandbox.cli import main
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry
from sandbox.rundir.decisions import plan
from sandbox.sweep.grid import applicable_combinations, expand, parse_grid, parse_seeds
from sandbox.rundir.directory import RunDirectory

SHORT = ["--set", "train.iters=2", "--set", "train.warmup_iters=2"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_grid_values_split_outside_brackets_and_quotes() -> None:
    axis = parse_grid('model.aspp_dilations=[1,2,3],[6,12,18]')
    assert axis.values == ("[1,2,3]", "[6,12,18]")
    assert parse_grid('dataset.root="a,b",c').values == ('"a,b"', "c")
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("perturbation.eps", "seed=1,2", "perturbation.eps=2,,4"):
        with pytest.raises(SandboxError):
            parse_grid(bad)
    with pytest.raises(SandboxError):
        parse_seeds("0,one")


def test_a_value_or_seed_listed_twice_is_an_error_not_a_silently_shorter_sweep() -> None:
    with pytest.raises(SandboxError, match=r"--seeds '0,1,0': seed 0 is listed twice"):
        parse_seeds("0,1,0")
    with pytest.raises(SandboxError, match=r"--grid 'perturbation.eps=2,4,2': the value 2 is listed twice"):
        parse_grid("perturbation.eps=2,4,2")
    assert parse_grid("perturbation.eps=2,2.0").values == ("2", "2.0"), "spellings differ: the recipe check decides"


def test_one_value_written_two_ways_is_an_error_not_two_runs_of_one_recipe(tiny_recipe: Path) -> None:
    for grid, labels in (
        ("perturbation.eps=2,4,2.0", "'perturbation.eps=2' and 'perturbation.eps=2.0'"),
        ("train.lr=1e-2,0.01", "'train.lr=1e-2' and 'train.lr=0.01'"),
    ):
        with pytest.raises(SandboxError, match=f"--grid: {re.escape(labels)} give the same recipe"):
            applicable_combinations(tiny_recipe, [], [parse_grid(grid)], load_registry)
    combinations, _ = applicable_combinations(tiny_recipe, [], [parse_grid("perturbation.eps=2,2.5")], load_registry)
    assert len(combinations) == 2, "values that differ still run"


def test_component_names_apply_first() -> None:
    combinations = expand([parse_grid("perturbation.eps=2,4"), parse_grid("perturbation.name=ddfp,none")])
    assert [c.label for c in combinations] == [
        "perturbation.name=ddfp,perturbation.eps=2",
        "perturbation.name=ddfp,perturbation.eps=4",
        "perturbation.name=none,perturbation.eps=2",
        "perturbation.name=none,perturbation.eps=4",
    ]


def test_options_a_plugin_does_not_take_are_dropped_once(tiny_recipe: Path) -> None:
    axes = [parse_grid("perturbation.name=ddfp,dropout,none"), parse_grid("perturbation.eps=2,4")]
    combinations, notes = applicable_combinations(tiny_recipe, [], axes, load_registry)
    assert [c.label for c in combinations] == [
        "perturbation.name=ddfp,perturbation.eps=2",
        "perturbation.name=ddfp,perturbation.eps=4",
        "perturbation.name=dropout",
        "perturbation.name=none",
    ]
    assert any("'dropout'" in note for note in notes) and any("'none'" in note for note in notes)


def test_an_option_no_combination_takes_is_a_typo_and_an_error(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """As in ``--set``: one line, exit 2, nothing trained or written (it was a note and one run)."""
    out = tmp_path / "sweep"
    code, _, err = run_cli(["ablate", str(tiny_recipe), "--grid", "perturbation.epz=1,2", "--output", str(out)], capsys)
    assert code == 2 and err == "error: --grid perturbation.epz: unknown option 'epz' for perturbation 'ddfp' (valid options: eps, norm)\n"
    assert not out.exists()
    axes = [parse_grid("perturbation.name=ddfp,none"), parse_grid("perturbation.epz=2,4")]
    with pytest.raises(SandboxError, match="'epz' for perturbation 'ddfp' .*; perturbation 'none' "):
        applicable_combinations(tiny_recipe, [], axes, load_registry)


def test_plan_skips_finished_resumes_checkpointed_restarts_others(tmp_path: Path) -> None:
    finished, resumable, bare, partial = (RunDirectory(tmp_path / name) for name in ("a", "b", "c", "d"))
    for run_dir in (finished, resumable, bare, partial):
        run_dir.path.mkdir()
        run_dir.recipe_file.write_text("name = 'x'\n")
    finished.summary_file.write_text("{}")
    (resumable.checkpoints / "step_00000002").mkdir(parents=True)
    (resumable.checkpoints / "step_00000002" / "COMPLETE").write_text("2")
    (partial.checkpoints / "step_00000004").mkdir(parents=True)  # never completed
    assert [plan(d) for d in (finished, resumable, bare, partial)] == ["skip", "resume", "start", "start"]


def test_list_imports_no_torch_accelerate_or_matplotlib(tiny_recipe: Path) -> None:
    """``--list`` of a grid of component names reads folders only: no plugin registry, so no torch.

    (A grid that sets a plugin option loads the registry, and with it torch, to check the option.)
    """
    result = run_without_heavy_imports(
        [["ablate", str(tiny_recipe), "--grid", "perturbation.name=none,dropout", "--seeds", "0", "--list"]]
    )
    assert result.returncode == 0, result.stderr
    assert "perturbation.name=dropout" in result.stdout and "2 runs: 2 to do" in result.stdout
    assert "2 combinations x 1 seeds = 2 runs" in result.stderr


def test_list_says_how_much_each_run_and_the_sweep_folder_hold_on_disk(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "sweep" / "tiny"
    done, partial, other = (folder / f"perturbation.name={name}" / "seed0" for name in ("none", "dropout", "vat"))
    files = {done / "summary.json": 1_000, done / "best.pt": 2_000_000,
             partial / "checkpoints" / "step_00000002" / "model.safetensors": 1_000_000,
             other / "last.pt": 500_000}  # a run of another grid in the same folder
    for path, size in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{}".ljust(size))
    code, out, _ = run_cli(["ablate", str(tiny_recipe), "--grid", "perturbation.name=none,dropout", "--seeds", "0",
                            "--output", str(tmp_path / "sweep"), "--list"], capsys)
    assert code == 0
    rows = {line.split("│")[2].strip(): line for line in out.splitlines() if "perturbation.name=" in line}
    assert "2.0 MB" in rows["perturbation.name=none"] and "1.0 MB" in rows["perturbation.name=dropout"]
    assert out.splitlines()[-1] == (
        f"3.5 MB on disk in {folder}: 3.0 MB in these 2 runs, 1.0 MB of it resumable checkpoints (checkpoints/; "
        "train.keep_checkpoints_when_done = false deletes a run's once it finishes)"
    )


def test_sweep_trains_skips_resumes_and_restarts(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["ablate", str(tiny_recipe), "--grid", "perturbation.name=none,dropout", "--seeds", "0", *SHORT]
    code, out, err = run_cli(args, capsys)
    folder = tiny_recipe.parent / "runs" / "ablations" / "tiny"
    runs = {name: folder / f"perturbation.name={name}" / "seed0" for name in ("dropout", "none")}
    assert code == 0, err
    for run in runs.values():
        assert json.loads((run / "summary.json").read_text())["iters"] == 2
        assert "seed = 0" in (run / "recipe.toml").read_text()
    assert "[1/2] perturbation.name=none seed0: training" in err and "[2/2] perturbation.name=dropout seed0: done" in err
    assert "perturbation.name" in out and "dropout" in out and "baseline" in out  # the compare table

    stamp = runs["dropout"].joinpath("summary.json").stat().st_mtime_ns
    (runs["none"] / "summary.json").unlink()  # interrupted after its last checkpoint
    code, out, err = run_cli(args, capsys)
    assert code == 0
    assert "perturbation.name=dropout seed0: finished already, skipped" in err
    assert "perturbation.name=none seed0: resuming from step_00000002" in err
    assert (runs["none"] / "summary.json").is_file()
    assert runs["dropout"].joinpath("summary.json").stat().st_mtime_ns == stamp
    code, _, err = run_cli([*args, "--set", "train.eval_every=7"], capsys)  # finished runs are kept, with a note
    assert code == 0 and err.count("trained with a different recipe: train.eval_every") == 2

    stale = folder / "perturbation.name=none" / "seed1"
    stale.mkdir()
    (stale / "recipe.toml").write_text("name = 'stale'\n")  # started, killed before any checkpoint
    (stale / "junk.txt").write_text("x")
    restart = ["ablate", str(tiny_recipe), "--grid", "perturbation.name=none", "--seeds", "1", *SHORT]
    code, _, err = run_cli(restart, capsys)
    assert code == 0 and "perturbation.name=none seed1: training" in err
    assert (stale / "summary.json").is_file() and not (stale / "junk.txt").exists()
    assert "seed = 1" in (stale / "recipe.toml").read_text()


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["ablate", str(tiny_recipe), "--grid", "train.lr=-1,-2", *SHORT], capsys)
    folder = tiny_recipe.parent / "runs" / "ablations" / "tiny"
    assert code == 1
    for label in ("train.lr=-1", "train.lr=-2"):
        marker = folder / label / "seed3" / FAILED_MARKER
        assert "train.lr" in marker.read_text() and f"{label} seed3: FAILED" in err
    assert "2 of 2 runs failed" in err and out.count("failed: ") == 2


def test_a_failed_runs_line_keeps_its_bracketed_table_names(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Rich markup ate ``[perturbation]`` from the live FAILED line."""
    code, _, err = run_cli(["ablate", str(tiny_recipe), "--grid", "dataset.num_labeled=0", *SHORT,
                            "--output", str(tmp_path / "sweep")], capsys)
    assert code == 1
    failed = [line for line in err.splitlines() if ": FAILED: " in line]
    assert len(failed) == 1 and "FAILED: [dataset] 'shapes' has no labeled images" in failed[0], failed
