"""``sandbox compare`` on fabricated run folders: grouping, statistics, baseline, formats."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from light_imports import run_without_heavy_imports
from sandbox.rundir.files import flatten_keys
from sandbox.analysis.compare import compare_runs
from sandbox.analysis.report import print_table, stderr_lines
from sandbox.analysis.runs import find_runs
from sandbox.rundir.files import FAILED_MARKER
from sandbox.cli import main
from sandbox.disk import human_bytes
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


def test_a_run_never_scored_is_not_ranked(tmp_path: Path) -> None:
    """A summary's None (never evaluated) or NaN (an old summary) is no score: -100.00 ranked best before."""
    write_run(tmp_path, "scored", 0, {"name": "ddfp"}, 0.5)
    for seed, value in enumerate((None, float("nan")), start=1):
        path = write_run(tmp_path, "scored", seed, {"name": "ddfp"}, 0.5)
        summary = json.loads((path / "summary.json").read_text())
        (path / "summary.json").write_text(json.dumps({**summary, "best_miou": value, "final_miou": value}))
    comparison = compare_runs(find_runs([tmp_path]))
    assert [group.n for group in comparison.groups] == [1] and comparison.groups[0].mean == pytest.approx(0.5)


def test_an_empty_val_split_is_refused_before_training(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["run", str(tiny_recipe), "--set", "dataset.num_val=0"], capsys)
    assert code == 2 and err == "error: [dataset] 'shapes' has no val images; evaluation needs at least one\n"
    assert not list((tmp_path / "runs").rglob("*.json")), "no summary, no metrics"


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
    assert code == 0 and out.startswith("\\begin{tabular}{llrrrrrrrr}")  # best, final, n, Δ, paired Δ, pairs, CI, by seed
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


@pytest.fixture
def repeated(tmp_path: Path) -> Path:
    """Seeds 0 and 1 of ddfp, seed 0 copied to a second folder and trained again into a third one; none seed 0."""
    root = tmp_path / "runs"
    original = write_run(root / "a", "ddfp", 0, {"name": "ddfp"}, 0.60)
    write_run(root / "a", "ddfp", 1, {"name": "ddfp"}, 0.64)
    shutil.copytree(original, root / "b" / "ddfp" / "seed0")  # the same run, copied
    write_run(root / "c", "ddfp", 0, {"name": "ddfp"}, 0.70)  # trained again: another result
    write_run(root / "a", "none", 0, {"name": "none"}, 0.50)
    return root


def test_a_seed_counts_once_per_group_keeping_the_first_path(repeated: Path) -> None:
    comparison = compare_runs(find_runs([repeated]))
    ddfp, none = comparison.groups
    assert ddfp.n == 2 and ddfp.seeds == [0, 1] and ddfp.scores == [0.60, 0.64]
    assert ddfp.mean == pytest.approx(0.62) and ddfp.std == pytest.approx(statistics.stdev([0.60, 0.64]))
    assert [run.path for run in ddfp.runs] == [repeated / "a/ddfp/seed0", repeated / "a/ddfp/seed1"]
    assert none.n == 1 and none.unequal_seeds  # 1 of 2 seeds once the repeats are left out
    [duplicate] = comparison.duplicates
    assert duplicate.group is ddfp and duplicate.seed == 0 and duplicate.kept.path == repeated / "a/ddfp/seed0"
    assert [run.path for run in duplicate.dropped] == [repeated / "b/ddfp/seed0", repeated / "c/ddfp/seed0"]
    assert duplicate.differing_results() == {"best_miou": [0.60, 0.60, 0.70], "final_miou": [0.60, 0.60, 0.70]}


def test_the_kept_run_follows_the_order_of_the_records(repeated: Path) -> None:
    records = find_runs([repeated])
    comparison = compare_runs(list(reversed(records)))
    assert comparison.duplicates[0].kept.path == repeated / "c/ddfp/seed0"
    assert comparison.groups[0].scores == [0.70, 0.64]  # the runs of a group keep the records' order


def test_one_seed_in_two_groups_counts_in_each(tmp_path: Path) -> None:
    write_run(tmp_path, "ddfp", 0, {"name": "ddfp"}, 0.6)
    write_run(tmp_path, "none", 0, {"name": "none"}, 0.5)
    comparison = compare_runs(find_runs([tmp_path]))
    assert [group.n for group in comparison.groups] == [1, 1] and comparison.duplicates == []


def test_identical_copies_are_noted_as_identical(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    original = write_run(tmp_path / "x", "solo", 3, {"name": "ddfp"}, 0.55)
    shutil.copytree(original, tmp_path / "y" / "solo" / "seed3")
    code, out, err = run_cli(["compare", str(tmp_path), "--format", "json"], capsys)
    assert code == 0 and json.loads(out)[0]["n"] == 1
    assert err.splitlines() == [
        f"note: seed 3 counted once in group all runs: kept {original}; left out {tmp_path / 'y/solo/seed3'} (identical results)"
    ]


@pytest.mark.parametrize("output", ["table", "md", "csv", "latex", "json"])
def test_every_format_shows_the_deduplicated_n_and_notes_the_repeats_on_stderr(
    repeated: Path, output: str, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = run_cli(["compare", str(repeated), "--format", output], capsys)
    assert code == 0
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "seed 0" in notes[0] and "perturbation.name=ddfp" in notes[0]
    kept, copied, retrained = (repeated / folder / "ddfp" / "seed0" for folder in "abc")
    assert f"kept {kept};" in notes[0] and f"left out {copied}, {retrained}" in notes[0]
    assert "results differ" in notes[0] and "best_miou 0.6 vs 0.6 vs 0.7" in notes[0]
    if output == "json":
        rows = json.loads(out)
        assert [row["n"] for row in rows] == [2, 1] and rows[0]["seeds"] == [0, 1] and rows[0]["scores"] == [0.60, 0.64]
        assert rows[0]["runs"] == [str(kept), str(repeated / "a/ddfp/seed1")]
    elif output == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [row["n"] for row in rows] == ["2", "1"] and rows[0]["seeds"] == "0 1"
        assert float(rows[0]["mean"]) == pytest.approx(0.62)
    elif output == "latex":
        body = out.split("\\midrule\n")[1].split("\\bottomrule")[0].splitlines()
        assert "{62.00 $\\pm$ 2.83} & \\textbf{2} &" in body[0] and "& 1$^\\dagger$ &" in body[1]
    else:
        assert re.search(r"62\.00 ± 2\.83\W*[|│]\W*2\W*[|│]", out), out
        assert "unequal seeds (1 of 2)" in out
    if output == "table":
        assert "3 finished runs (2 runs repeating a seed not counted)" in out


def test_print_table_notes_repeats_on_stderr_as_ablate_shows_them(repeated: Path, capsys: pytest.CaptureFixture) -> None:
    table = io.StringIO()
    print_table(compare_runs(find_runs([repeated])), Console(file=table, width=200))  # as ``sandbox ablate`` ends
    err = capsys.readouterr().err
    assert "62.00 ± 2.83 │ 2 │" in table.getvalue()
    assert "final_miou (%)" in table.getvalue() and "paired Δ (pp)" in table.getvalue()  # one renderer for compare and ablate
    assert len(err.splitlines()) == 1 and err.startswith("note: seed 0 counted once")


def test_recipe_keys_flatten_to_dotted_names() -> None:
    nested = {"seed": 0, "train": {"iters": 5, "lr": {"base": 0.1}}, "model": {"aspp_dilations": [6, 12]}, "empty": {}}
    assert flatten_keys(nested) == {"seed": 0, "train.iters": 5, "train.lr.base": 0.1, "model.aspp_dilations": [6, 12]}


def test_compare_imports_no_torch_accelerate_or_matplotlib(ablation: Path) -> None:
    result = run_without_heavy_imports(
        [["compare", str(ablation), "--format", output] for output in ("table", "md", "csv", "latex", "json")]
    )
    assert result.returncode == 0, result.stderr
    assert "ddfp" in result.stdout and "\\begin{tabular}" in result.stdout


def strict_json(text: str) -> Any:
    """``text`` parsed as strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` are refused."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def on_dataset(path: Path, dataset: str, classes: list[str]) -> Path:
    """Put the run of ``write_run`` on ``[dataset]`` table ``dataset`` (TOML lines), scored on ``classes``."""
    recipe = (path / "recipe.toml").read_text()
    (path / "recipe.toml").write_text(recipe.replace('[dataset]\nname = "shapes"\n', f"[dataset]\n{dataset}\n"))
    summary = json.loads((path / "summary.json").read_text())
    summary["best_per_class_iou"] = {name: summary["best_miou"] for name in classes}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_runs_on_different_datasets_are_warned_about_and_the_footer_names_the_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Runs on two datasets got a Δ and a paired Δ without a word, and the footer read ``dataset.class_names=``
    (the value ``[bg,cat]`` was taken for rich markup); the table ends with how much the runs hold on disk."""
    pets = 'name = "folder"\nroot = "/data/pets"\nclass_names = ["bg", "cat"]'
    for seed, (shapes, folder) in enumerate([(0.6, 0.3), (0.62, 0.35)]):
        write_run(tmp_path, "shapes", seed, {"name": "ddfp"}, shapes)
        on_dataset(write_run(tmp_path, "pets", seed, {"name": "ddfp"}, folder), pets, ["bg", "cat"])
    code, out, err = run_cli(["compare", str(tmp_path)], capsys)
    assert code == 0
    assert err.splitlines() == [
        "warning: the runs are not all on one dataset (they differ in dataset.name, dataset.root, dataset.class_names): "
        "each is scored on its own val set and classes, so Δ and paired Δ compare different data, not methods",
    ]
    size = sum(path.stat().st_size for path in tmp_path.rglob("*") if path.is_file())
    assert out.splitlines()[-1] == f"disk: 4 run folders hold {human_bytes(size)}"
    assert "Δ vs baseline dataset.name=folder, dataset.root=/data/pets, dataset.class_names=[bg,cat];" in " ".join(out.split())
    for output in ("md", "json"):
        code, _, err = run_cli(["compare", str(tmp_path), "--format", output], capsys)
        assert code == 0 and err.startswith("warning: the runs are not all on one dataset")


def test_training_split_keys_do_not_make_another_dataset(tmp_path: Path) -> None:
    """Runs differing only in which training images they use are scored on the same val set: no warning;
    ``dataset.seed`` draws the val images of ``shapes`` only, and other class names are another dataset."""

    def differences(first: str, second: str, classes: tuple[list[str], list[str]] = (["a"], ["a"])) -> list[str]:
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        for seed, (dataset, names) in enumerate(zip((first, second), classes)):
            on_dataset(write_run(root, f"run{seed}", seed, {"name": "ddfp"}, 0.5), dataset, names)
        return compare_runs(find_runs([root])).dataset_differences

    folder = 'name = "folder"\nroot = "/data/pets"\nclass_names = ["a"]'
    assert differences(f"{folder}\nlabeled = 4", f"{folder}\nlabeled = 8") == []
    assert differences(f"{folder}\nseed = 1", f"{folder}\nseed = 2") == []
    assert differences('name = "shapes"\nnum_labeled = 8', 'name = "shapes"\nnum_labeled = 16') == []
    assert differences('name = "shapes"\nseed = 1', 'name = "shapes"\nseed = 2') == ["dataset.seed"]
    assert differences(folder, folder, (["a"], ["b"])) == ["class names"]


def test_json_output_is_strict_json_when_a_recipe_value_is_not_finite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A recipe may hold ``nan`` (TOML has it): ``--format json`` stopped with a traceback (exit 1); now null."""
    for seed, eps in enumerate(("2.0", "nan")):
        path = write_run(tmp_path, f"eps-{eps}", seed, {"name": "ddfp", "eps": 2.0}, 0.5)
        (path / "recipe.toml").write_text((path / "recipe.toml").read_text().replace("eps = 2.0", f"eps = {eps}"))
    code, out, err = run_cli(["compare", str(tmp_path), "--format", "json"], capsys)
    assert code == 0, err
    assert [row["group"]["perturbation.eps"] for row in strict_json(out)] == [2.0, None]


def computed_on(path: Path, **compute: Any) -> Path:
    """Give the run of ``write_run`` a summary ``compute`` record (``sandbox.train.determinism.compute_record``)."""
    summary = json.loads((path / "summary.json").read_text())
    summary["compute"] = {"device": "cpu", "threads": 1, "cpu_capability": "AVX512", "deterministic": False, **compute}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_runs_computed_on_other_threads_or_cpu_kernels_are_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The thread count alone moved ssl_benchmark's supervised seed 0 from 54.84 (1 thread) to 50.03 (default):
    runs paired across thread counts or CPU kernels compare that too, and compare says so."""
    for seed in (0, 1):
        computed_on(write_run(tmp_path, "none", seed, {"name": "none"}, 0.5))
        computed_on(write_run(tmp_path, "ddfp", seed, {"name": "ddfp"}, 0.6), threads=2 if seed else 1)
    code, _, err = run_cli(["compare", str(tmp_path), "--baseline", "perturbation.name=none"], capsys)
    assert code == 0
    assert err.splitlines() == [
        "warning: the runs did not all compute alike (they differ in threads (1, 2)): the order of floating-point sums "
        "differs, and one seed can end points apart; Δ and paired Δ mix that with the methods",
    ]
    alike = tmp_path / "alike"
    for seed in (0, 1):
        computed_on(write_run(alike, "none", seed, {"name": "none"}, 0.5))
        write_run(alike, "ddfp", seed, {"name": "ddfp"}, 0.6)  # written before the record existed
    comparison = compare_runs(find_runs([alike]))
    assert comparison.compute_differences == [] and comparison.unrecorded == 2
    assert stderr_lines(comparison) == [
        "note: 2 of the runs were saved before summary.json recorded their threads, CPU kernels and device: whether they "
        "computed like the others is not known"]
    computed_on(alike / "ddfp" / "seed0", cpu_capability="AVX2")
    computed_on(alike / "ddfp" / "seed1")
    assert compare_runs(find_runs([alike])).compute_differences == ["cpu_capability (AVX2, AVX512)"]


def test_a_setting_added_since_a_run_was_saved_does_not_split_its_group(tmp_path: Path) -> None:
    """Runs saved before ``train.deterministic`` existed lack the key; at its default they ran as the runs
    saved after it: one group, not two (``train.deterministic = -`` beside ``false``)."""
    for seed in (0, 1):
        path = write_run(tmp_path, "ddfp", seed, {"name": "ddfp"}, 0.5 + seed / 10)
        if seed == 0:
            text = (path / "recipe.toml").read_text()
            assert "deterministic = false\n" in text
            (path / "recipe.toml").write_text(text.replace("deterministic = false\n", ""))
    comparison = compare_runs(find_runs([tmp_path]))
    assert [group.n for group in comparison.groups] == [2] and comparison.keys == []
    path = write_run(tmp_path, "ddfp-det", 2, {"name": "ddfp"}, 0.7)
    (path / "recipe.toml").write_text((path / "recipe.toml").read_text().replace("deterministic = false", "deterministic = true"))
    assert compare_runs(find_runs([tmp_path])).keys == ["train.deterministic"], "a value other than the default still differs"
