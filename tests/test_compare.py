"""``sandbox compare`` on fabricated run folders: grouping, statistics, baseline, formats."""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from sandbox.analysis.compare import compare_runs
from sandbox.analysis.runs import FAILED_MARKER, find_runs
from sandbox.cli import main
from sandbox.recipe import Recipe

SCORES = {
    ("ddfp", 2.0): [0.61, 0.64, 0.60],
    ("ddfp", 4.0): [0.66, 0.69, 0.65],
    ("none", None): [0.58, 0.57],
}


def write_run(
    root: Path, label: str, seed: int, perturbation: dict[str, Any], best: float | None, final: float | None = None
) -> Path:
    """A run folder as ``sandbox run`` leaves it (summary.json only when ``best`` is given)."""
    recipe = Recipe.model_validate(
        {"name": label, "seed": seed, "output_dir": str(root), "dataset": {"name": "shapes"}, "perturbation": perturbation}
    )
    path = root / label / f"seed{seed}"
    path.mkdir(parents=True)
    (path / "recipe.toml").write_text(recipe.to_toml())
    records = [{"step": 10, "loss": 1.0, "lr": 0.01}, {"step": 20, "val_miou": best or 0.1, "val_per_class_iou": {"a": 0.1}}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    if best is not None:
        summary = {"recipe": label, "seed": seed, "best_miou": best, "final_miou": best if final is None else final}
        (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def ablation(tmp_path: Path) -> Path:
    """Three groups (one with fewer seeds), an unfinished run and a failed run."""
    root = tmp_path / "abl"
    for (name, eps), scores in SCORES.items():
        perturbation = {"name": name} if eps is None else {"name": name, "eps": eps}
        for seed, score in enumerate(scores):
            write_run(root, f"{name}-{eps}", seed, perturbation, score, final=score - 0.01)
    write_run(root, "ddfp-8.0", 0, {"name": "ddfp", "eps": 8.0}, None)
    failed = root / "broken" / "seed0"
    failed.mkdir(parents=True)
    (failed / FAILED_MARKER).write_text("tiny.toml: train.lr = -1: input should be greater than 0\n")
    return root


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_groups_by_differing_keys_with_sample_statistics(ablation: Path) -> None:
    comparison = compare_runs(find_runs([ablation]))
    assert comparison.keys == ["perturbation.name", "perturbation.eps"]
    assert [tuple(group.values.values()) for group in comparison.groups] == list(SCORES)
    baseline_mean = statistics.fmean(SCORES[("none", None)])
    for group, scores in zip(comparison.groups, SCORES.values()):
        assert group.n == len(scores)
        assert group.mean == pytest.approx(statistics.fmean(scores))
        assert group.std == pytest.approx(statistics.stdev(scores))
        assert group.delta == pytest.approx(statistics.fmean(scores) - baseline_mean)
    assert [group.baseline for group in comparison.groups] == [False, False, True]
    assert [group.best for group in comparison.groups] == [False, True, False]
    assert [group.unequal_seeds for group in comparison.groups] == [False, False, True]
    assert sorted(run.status for run in comparison.excluded) == ["failed", "unfinished"]


def test_seed_name_and_output_dir_do_not_split_groups(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "first", 0, {"name": "ddfp"}, 0.5)
    write_run(tmp_path / "b", "second", 1, {"name": "ddfp"}, 0.7)
    comparison = compare_runs(find_runs([tmp_path]))
    assert comparison.keys == [] and len(comparison.groups) == 1
    group = comparison.groups[0]
    assert group.n == 2 and group.mean == pytest.approx(0.6) and group.label() == "all runs"


def test_single_run_has_no_std(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = write_run(tmp_path, "solo", 0, {"name": "ddfp"}, 0.4321)
    assert compare_runs(find_runs([run])).groups[0].std is None
    code, out, _ = run_cli(["compare", str(run), "--format", "md"], capsys)
    assert code == 0 and "43.21 ± -" in out


def test_explicit_baseline_and_final_metric(ablation: Path) -> None:
    comparison = compare_runs(find_runs([ablation]), "final_miou", ["perturbation.eps=4"])
    reference = statistics.fmean(score - 0.01 for score in SCORES[("ddfp", 4.0)])
    assert [group.baseline for group in comparison.groups] == [False, True, False]
    first = comparison.groups[0]
    assert first.delta == pytest.approx(statistics.fmean(score - 0.01 for score in SCORES[("ddfp", 2.0)]) - reference)


def test_bad_baseline_is_a_one_line_error(ablation: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["compare", str(ablation), "--baseline", "train.lr=1"], capsys)
    assert code == 2 and "differs between the runs" in err and err.count("\n") == 1
    code, _, err = run_cli(["compare", str(ablation), "--baseline", "perturbation.name=vat"], capsys)
    assert code == 2 and "no group matches" in err and "ddfp, none" in err


def test_missing_folder_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["compare", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err


def test_table_marks_best_and_lists_left_out_runs(ablation: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["compare", str(ablation)], capsys)
    assert code == 0
    best = SCORES[("ddfp", 4.0)]
    best_line = next(line for line in out.splitlines() if f"{100 * statistics.fmean(best):.2f}" in line)
    assert f"{100 * statistics.stdev(best):.2f}" in best_line and "best" in best_line
    assert "unequal seeds (2 of 3)" in out and "baseline" in out
    assert re.search(r"unfinished: .*ddfp-8\.0.seed0 \(last logged step 20 of", out)
    assert re.search(r"failed: .*broken.seed0: tiny\.toml: train\.lr = -1", out)


def test_markdown_is_a_github_table(ablation: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["compare", str(ablation), "--format", "md"], capsys)
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert code == 0 and len(rows) == 2 + len(SCORES)
    assert rows[1].startswith("| --- | --- | ---:")
    assert all(cell.startswith("**") for cell in rows[3].strip("| ").split(" | ") if cell)
    assert "- unfinished:" in out and "- failed:" in out


def test_csv_holds_raw_values(ablation: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["compare", str(ablation), "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == len(SCORES)
    for row, scores in zip(rows, SCORES.values()):
        assert float(row["mean"]) == pytest.approx(statistics.fmean(scores), abs=1e-12)
        assert float(row["std"]) == pytest.approx(statistics.stdev(scores), abs=1e-12)
        assert int(row["n"]) == len(scores)
    assert rows[2]["perturbation.eps"] == "" and rows[2]["baseline"] == "True" and rows[1]["best"] == "True"
    assert "unfinished:" in err and "failed:" in err


def test_json_is_a_list_of_rows(ablation: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["compare", str(ablation), "--format", "json"], capsys)
    rows = json.loads(out)
    assert code == 0 and [row["group"]["perturbation.name"] for row in rows] == ["ddfp", "ddfp", "none"]
    assert rows[2]["std"] == pytest.approx(statistics.stdev(SCORES[("none", None)]))
    assert rows[2]["unequal_seeds"] is True and rows[1]["best"] is True and rows[0]["scores"] == SCORES[("ddfp", 2.0)]


def test_latex_is_a_booktabs_tabular(ablation: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["compare", str(ablation), "--format", "latex"], capsys)
    assert code == 0 and out.startswith("\\begin{tabular}{llrrr}")
    body = out.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    assert len(body) == len(SCORES) and all(line.endswith("\\\\") for line in body)
    assert "\\toprule" in out and "\\end{tabular}" in out and "best\\_miou (\\%)" in out
    assert body[1].startswith("\\textbf{ddfp}") and "$^\\dagger$" in body[2]
    assert "% failed:" in out


def test_columns_show_only_the_chosen_keys_and_must_tell_groups_apart(ablation: Path, capsys: pytest.CaptureFixture) -> None:
    full = compare_runs(find_runs([ablation]))
    assert full.keys == ["perturbation.name", "perturbation.eps"]
    shown = compare_runs(find_runs([ablation]), columns=["perturbation.eps"])
    assert shown.keys == ["perturbation.eps"] and all(list(group.values) == ["perturbation.eps"] for group in shown.groups)
    assert [group.mean for group in shown.groups] == [group.mean for group in full.groups]
    assert [group.baseline for group in shown.groups] == [group.baseline for group in full.groups]
    code, out, _ = run_cli(["compare", str(ablation), "--format", "md", "--columns", "perturbation.eps"], capsys)
    assert code == 0 and out.splitlines()[0].startswith("| perturbation.eps | best_miou (%)")
    code, _, err = run_cli(["compare", str(ablation), "--columns", "train.lr"], capsys)
    assert code == 2 and "--columns train.lr: not a key that differs" in err and "perturbation.eps" in err


def test_columns_that_hide_what_separates_two_groups_are_refused(ablation: Path) -> None:
    write_run(ablation, "ddfp-4.0-l1", 0, {"name": "ddfp", "eps": 4.0, "norm": "linf"}, 0.5)
    with pytest.raises(Exception, match="two groups look alike; add one of perturbation.norm"):
        compare_runs(find_runs([ablation]), columns=["perturbation.name", "perturbation.eps"])
