"""``sandbox compare``: the t quantile, the paired Δ by seed, final next to best, the hidden-keys warning, absent keys."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import tomllib
from pathlib import Path
from typing import Any

import pytest

from sandbox.analysis.compare import compare_runs, differing_keys
from sandbox.analysis.paired import CI_NO_PAIRS, CI_OK, CI_ONE_PAIR, CI_ZERO_VARIANCE, mean_confidence_interval, pair_by_seed
from sandbox.analysis.runs import find_runs
from sandbox.analysis.student_t import regularized_incomplete_beta, t_cdf, t_quantile
from sandbox.recipe import Recipe
from test_compare import run_cli, write_run

T_975_DF2 = 4.302652729749752
"""``t_quantile(0.975, 2)``: the factor of a 95% interval over three pairs."""


@pytest.mark.parametrize(
    ("p", "df", "table"),
    [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 10, 2.228), (0.975, 30, 2.042), (0.95, 5, 2.015), (0.995, 3, 5.841)],
)
def test_t_quantile_matches_the_printed_table(p: float, df: int, table: float) -> None:
    assert t_quantile(p, df) == pytest.approx(table, abs=5e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-table, abs=5e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999, 0.9999999])
def test_t_quantile_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(p: float) -> None:
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_t_cdf_inverts_the_quantile_and_tends_to_the_normal() -> None:
    assert t_cdf(0.0, 7) == 0.5 and t_quantile(0.5, 7) == 0.0
    for df in (1, 2.5, 9, 200):
        assert t_cdf(t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-10)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)
    assert regularized_incomplete_beta(0.3, 1.0, 1.0) == pytest.approx(0.3)  # Beta(1, 1) is uniform
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


def test_pairs_by_seed_and_lists_the_seeds_without_a_partner() -> None:
    paired = pair_by_seed([2, 0, 1, 7], [0.62, 0.60, 0.61, 0.9], [0, 1, 2, 3], [0.50, 0.52, 0.50, 0.4])
    assert paired.seeds == [2, 0, 1] and paired.deltas == pytest.approx([0.12, 0.10, 0.09])
    assert paired.only_here == [7] and paired.only_in_baseline == [3] and paired.unpaired
    mean, std = statistics.fmean(paired.deltas), statistics.stdev(paired.deltas)
    assert paired.mean == pytest.approx(mean) and paired.std == pytest.approx(std)
    half_width = T_975_DF2 * std / math.sqrt(3)
    assert paired.interval == pytest.approx((mean - half_width, mean + half_width))
    assert paired.excludes_zero is True


def test_one_pair_has_no_std_and_no_interval() -> None:
    paired = pair_by_seed([0, 1], [0.6, 0.7], [0], [0.5])
    assert paired.n == 1 and paired.mean == pytest.approx(0.1)
    assert paired.std is None and paired.interval is None and paired.excludes_zero is None
    assert pair_by_seed([1], [0.6], [0], [0.5]).mean is None
    assert mean_confidence_interval([0.1]) is None


def test_an_interval_that_straddles_zero_does_not_exclude_it() -> None:
    paired = pair_by_seed([0, 1, 2], [0.51, 0.49, 0.52], [0, 1, 2], [0.50, 0.50, 0.50])
    low, high = paired.interval or (0.0, 0.0)
    assert low < 0 < high and paired.excludes_zero is False


@pytest.fixture
def paired_runs(tmp_path: Path) -> Path:
    """none (the baseline) seeds 0-2; ddfp seeds 0-3 (3 unpaired), a clear gain; dropout seeds 0 and 5 (one pair)."""
    root = tmp_path / "runs"
    for seed, score in enumerate([0.50, 0.52, 0.54]):
        write_run(root, "none", seed, {"name": "none"}, score, final=score - 0.02)
    for seed, score in enumerate([0.55, 0.58, 0.59, 0.70]):
        write_run(root, "ddfp", seed, {"name": "ddfp"}, score, final=score - 0.01)
    for seed, score in [(0, 0.51), (5, 0.60)]:
        write_run(root, "dropout", seed, {"name": "dropout"}, score, final=score - 0.03)
    return root


def test_compare_pairs_each_group_with_the_baseline_by_seed(paired_runs: Path) -> None:
    ddfp, dropout, none = compare_runs(find_runs([paired_runs])).groups
    assert none.baseline and none.paired is None
    assert ddfp.paired is not None and ddfp.paired.seeds == [0, 1, 2] and ddfp.paired.only_here == [3]
    assert ddfp.paired.deltas == pytest.approx([0.05, 0.06, 0.05]) and ddfp.paired.excludes_zero is True
    mean, std = statistics.fmean([0.05, 0.06, 0.05]), statistics.stdev([0.05, 0.06, 0.05])
    assert ddfp.paired.interval == pytest.approx((mean - T_975_DF2 * std / math.sqrt(3), mean + T_975_DF2 * std / math.sqrt(3)))
    assert dropout.paired is not None and dropout.paired.deltas == pytest.approx([0.01]) and dropout.paired.std is None
    assert dropout.paired.only_here == [5] and dropout.paired.only_in_baseline == [1, 2]
    assert ddfp.secondary_scores == pytest.approx([0.54, 0.57, 0.58, 0.69])


def test_final_metric_pairs_the_final_values(paired_runs: Path) -> None:
    ddfp = compare_runs(find_runs([paired_runs]), "final_miou").groups[0]
    assert ddfp.paired is not None and ddfp.paired.deltas == pytest.approx([0.06, 0.07, 0.06])
    assert ddfp.secondary_scores == pytest.approx([0.55, 0.58, 0.59, 0.70])


def test_json_holds_the_paired_delta_with_null_never_nan(paired_runs: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["compare", str(paired_runs), "--format", "json"], capsys)
    rows = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert code == 0 and err == ""
    ddfp, dropout, none = rows
    assert none["paired"] is None and none["secondary"]["metric"] == "final_miou"
    assert ddfp["paired"]["seeds"] == [0, 1, 2] and ddfp["paired"]["seeds_only_here"] == [3]
    assert ddfp["paired"]["excludes_zero"] is True and ddfp["paired"]["level"] == 0.95
    assert ddfp["paired"]["ci_low"] > 0 and ddfp["paired"]["mean"] == pytest.approx(statistics.fmean([0.05, 0.06, 0.05]))
    assert dropout["paired"]["n"] == 1 and dropout["paired"]["std"] is None
    assert dropout["paired"]["ci_low"] is None and dropout["paired"]["ci_high"] is None and dropout["paired"]["excludes_zero"] is None
    assert dropout["paired"]["seeds_only_in_baseline"] == [1, 2]
    assert ddfp["secondary"]["mean"] == pytest.approx(statistics.fmean([0.54, 0.57, 0.58, 0.69]))


def test_markdown_shows_final_next_to_best_and_the_paired_columns(paired_runs: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["compare", str(paired_runs), "--format", "md"], capsys)
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == (
        "| perturbation.name | best_miou (%) | final_miou (%) | n | Δ (pp) | paired Δ (pp) | pairs | 95% CI (pp) | Δ by seed (pp) | notes |"
    )
    ddfp, dropout, none = (line.strip("| ").replace("**", "").split(" | ") for line in lines[2:5])
    assert ddfp[1:7] == ["60.50 ± 6.56", "59.50 ± 6.56", "4", "+8.50", "+5.33 ± 0.58", "3"]
    assert ddfp[7] == "[+3.90, +6.77]" and ddfp[8] == "0: +5.00, 1: +6.00, 2: +5.00"
    assert "CI excludes 0" in ddfp[9] and "seeds not in baseline: 3" in ddfp[9]
    assert dropout[5:9] == ["+1.00 ± -", "1", "n/a (1 pair)", "0: +1.00"] and "baseline seeds missing: 1, 2" in dropout[9]
    assert "CI excludes 0" not in dropout[9]
    assert none[5:9] == ["-", "-", "-", "-"] and none[9].startswith("baseline")


def test_final_metric_puts_final_first_and_best_beside_it(paired_runs: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["compare", str(paired_runs), "--format", "md", "--metric", "final_miou"], capsys)
    header, _, ddfp = out.splitlines()[:3]
    assert code == 0 and header.startswith("| perturbation.name | final_miou (%) | best_miou (%) | n | Δ (pp) |")
    assert ddfp.startswith("| **ddfp** | **59.50 ± 6.56** | **60.50 ± 6.56** | **4** | **+9.50** | **+6.33 ± 0.58** |")


@pytest.mark.parametrize("output", ["table", "md", "csv", "latex", "json"])
def test_every_format_shows_both_values_and_the_interval(paired_runs: Path, output: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["compare", str(paired_runs), "--format", output], capsys)
    assert code == 0 and "warning" not in err and "nan" not in out.lower()
    if output == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert float(rows[0]["final_miou_mean"]) == pytest.approx(0.605 - 0.01)
        assert rows[0]["ci_excludes_zero"] == "True" and rows[0]["paired_seeds"] == "0 1 2" and rows[0]["seeds_only_here"] == "3"
        assert rows[1]["paired_std"] == "" and rows[1]["ci_low"] == "" and rows[1]["seeds_only_in_baseline"] == "1 2"
        assert rows[2]["paired_n"] == "" and rows[2]["baseline"] == "True"
    elif output == "json":
        assert json.loads(out)[0]["secondary"]["metric"] == "final_miou"
    elif output == "latex":
        assert out.startswith("\\begin{tabular}{lrrrrrrrr}") and "final\\_miou (\\%)" in out and "95\\% CI (pp)" in out
        assert out.splitlines()[4].endswith("[+3.90, +6.77]$^*$} & \\textbf{0: +5.00, 1: +6.00, 2: +5.00} \\\\") and "% $^*$: the 95\\% CI of the paired $\\Delta$ excludes 0" in out
        assert "% perturbation.name=dropout: seeds not in baseline: 5; baseline seeds missing: 1, 2" in out
    else:
        assert "final_miou (%)" in out and "95% CI (pp)" in out and "59.50 ± 6.56" in out and "+5.33 ± 0.58" in out


def test_a_value_no_run_has_gets_no_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, score in [("none", 0.5), ("ddfp", 0.6)]:
        path = write_run(tmp_path, name, 0, {"name": name}, score)
        (path / "summary.json").write_text(json.dumps({"seed": 0, "best_miou": score}))  # an old summary: no final
    code, out, _ = run_cli(["compare", str(tmp_path), "--format", "md"], capsys)
    assert code == 0 and "final_miou" not in out.splitlines()[0]
    assert out.splitlines()[2] == "| **ddfp** | **60.00 ± -** | **1** | **+10.00** | **+10.00 ± -** | **1** | **n/a (1 pair)** | **0: +10.00** | **best** |"


def test_a_group_whose_run_lacks_the_value_shows_a_dash(paired_runs: Path, capsys: pytest.CaptureFixture) -> None:
    summary = paired_runs / "dropout" / "seed5" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "final_miou": None}))
    code, out, _ = run_cli(["compare", str(paired_runs), "--format", "md"], capsys)
    assert code == 0 and "| final_miou (%) |" in out.splitlines()[0]
    assert out.splitlines()[3].startswith("| dropout | 55.50 ± 6.36 | - | 2 |")


def test_columns_hiding_a_differing_key_warn_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, eps, score in [("none", None, 0.5), ("ddfp", 2.0, 0.6), ("ddfp", 4.0, 0.62)]:
        perturbation = {"name": name} if eps is None else {"name": name, "eps": eps}
        write_run(tmp_path, f"{name}-{eps}", 0, perturbation, score)
    assert compare_runs(find_runs([tmp_path]), columns=["perturbation.eps"]).hidden_keys == ["perturbation.name"]
    code, out, err = run_cli(["compare", str(tmp_path), "--format", "md", "--columns", "perturbation.eps"], capsys)
    assert code == 0 and out.startswith("| perturbation.eps |")
    assert err.splitlines() == [
        "warning: the groups also differ in perturbation.name, which --columns perturbation.eps does not show: "
        "rows compare more than their columns say"
    ]
    code, _, err = run_cli(["compare", str(tmp_path), "--format", "md"], capsys)
    assert code == 0 and err == ""
    code, _, err = run_cli(["compare", str(tmp_path), "--format", "md", "--columns", "perturbation.name,perturbation.eps"], capsys)
    assert code == 0 and err == ""


def write_density_run(root: Path, label: str, seed: int, perturbation: str, density: dict[str, Any] | None, score: float) -> Path:
    """A run whose recipe, as ``sandbox run`` now saves it, has a ``[density]`` table only when ``density`` is given."""
    path = write_run(root, label, seed, {"name": perturbation}, score)
    recipe = Recipe.model_validate(tomllib.loads((path / "recipe.toml").read_text()) | {"density": density or {"name": "glow"}})
    (path / "recipe.toml").write_text(recipe.to_toml(omit=[] if density else ["density"]))
    return path


@pytest.fixture
def density_runs(tmp_path: Path) -> Path:
    """ddfp with glow and with gmm (``density.lr`` the same in both), and none, whose recipes have no ``[density]``."""
    for seed in (0, 1):
        write_density_run(tmp_path, "ddfp-glow", seed, "ddfp", {"name": "glow", "lr": 0.001}, 0.60 + seed / 100)
        write_density_run(tmp_path, "ddfp-gmm", seed, "ddfp", {"name": "gmm", "lr": 0.001}, 0.58 + seed / 100)
        write_density_run(tmp_path, "none", seed, "none", None, 0.55 + seed / 100)
    return tmp_path


def test_a_key_only_some_runs_have_differs_only_by_its_values_where_present(density_runs: Path) -> None:
    assert "density" not in tomllib.loads((density_runs / "none/seed0/recipe.toml").read_text())
    comparison = compare_runs(find_runs([density_runs]))
    assert comparison.keys == ["density.name", "perturbation.name"]  # recipe order; not density.lr: 0.001 wherever it is
    assert [list(group.values.values()) for group in comparison.groups] == [["glow", "ddfp"], ["gmm", "ddfp"], [None, "none"]]
    assert comparison.groups[2].baseline and comparison.hidden_keys == []
    assert differing_keys([{"p.a": 1, "d.b": 2}, {"p.a": 2}, {"p.a": 2, "d.b": 2}]) == ["p.a"]  # no [d]: no part
    assert differing_keys([{"d.b": 1}, {"p.a": 1}, {"d.b": 2, "p.a": 1}]) == ["d.b"]
    assert differing_keys([{"p.a": 1, "p.norm": "linf"}, {"p.a": 1}]) == ["p.norm"]  # [p] saved: a missing key is None


def test_an_absent_key_shows_a_dash_and_raises_no_warning(density_runs: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["compare", str(density_runs), "--format", "md"], capsys)
    assert code == 0 and err == ""
    assert out.startswith("| density.name | perturbation.name | best_miou (%) |")
    assert out.splitlines()[4].startswith("| - | none | 55.50 ± 0.71 |") and "baseline" in out.splitlines()[4]
    code, out, err = run_cli(["compare", str(density_runs), "--format", "csv"], capsys)
    assert code == 0 and list(csv.DictReader(io.StringIO(out)))[2]["density.name"] == ""
    code, out, err = run_cli(["compare", str(density_runs), "--format", "md", "--columns", "density.name"], capsys)
    assert code == 0 and out.startswith("| density.name |")
    assert err.splitlines() == [  # perturbation.name only: never the density.* keys that are constant among ddfp runs
        "warning: the groups also differ in perturbation.name, which --columns density.name does not show: "
        "rows compare more than their columns say"
    ]
    code, _, err = run_cli(["compare", str(density_runs), "--format", "md", "--columns", "density.name,perturbation.name"], capsys)
    assert code == 0 and err == ""


# --- issue 34: an interval of width 0 (all differences equal) or of one pair says nothing ------------


def test_equal_differences_give_a_degenerate_interval_that_never_excludes_zero() -> None:
    exact = pair_by_seed([0, 1], [1.5, 2.5], [0, 1], [0.5, 1.5])  # differences 1.0 and 1.0, bit for bit
    assert exact.deltas == [1.0, 1.0] and exact.std == 0.0 and exact.interval == (1.0, 1.0)
    assert exact.ci_status == CI_ZERO_VARIANCE and exact.excludes_zero is None
    rounded = pair_by_seed([0, 1], [0.41, 0.42], [0, 1], [0.40, 0.41])  # 0.01 each, unequal in the 17th digit
    assert rounded.deltas[0] != rounded.deltas[1] and 0 < rounded.std < 1e-15
    assert rounded.ci_status == CI_ZERO_VARIANCE and rounded.excludes_zero is None
    three = pair_by_seed([0, 1, 2], [0.30, 0.31, 0.40], [0, 1, 2], [0.40, 0.41, 0.50])  # -0.10 three times
    assert three.ci_status == CI_ZERO_VARIANCE and three.excludes_zero is None and three.n == 3
    zeros = pair_by_seed([0, 1], [0.5, 0.6], [0, 1], [0.5, 0.6])
    assert zeros.ci_status == CI_ZERO_VARIANCE and zeros.excludes_zero is None


def test_a_small_real_spread_is_an_interval() -> None:
    paired = pair_by_seed([0, 1], [0.51, 0.5100001], [0, 1], [0.50, 0.50])  # differences 1e-7 apart: a spread, not rounding
    assert paired.ci_status == CI_OK and paired.excludes_zero is True
    low, high = paired.interval or (0.0, 0.0)
    assert high - low == pytest.approx(2 * t_quantile(0.975, 1) * statistics.stdev(paired.deltas) / math.sqrt(2))


def test_one_pair_and_no_pair_have_no_interval_and_say_why() -> None:
    one = pair_by_seed([0, 1], [0.6, 0.7], [0], [0.5])
    assert one.ci_status == CI_ONE_PAIR and one.interval is None and one.excludes_zero is None
    none = pair_by_seed([7], [0.6], [0], [0.5])
    assert none.ci_status == CI_NO_PAIRS and none.interval is None and none.excludes_zero is None and none.mean is None
    assert pair_by_seed([0, 1, 2], [0.51, 0.49, 0.52], [0, 1, 2], [0.5, 0.5, 0.5]).ci_status == CI_OK


def test_an_interval_wholly_below_zero_excludes_it() -> None:
    paired = pair_by_seed([0, 1, 2], [0.37, 0.38, 0.46], [0, 1, 2], [0.40, 0.41, 0.50])  # -3, -3, -4 points
    low, high = paired.interval or (0.0, 0.0)
    assert low < high < 0 and paired.ci_status == CI_OK and paired.excludes_zero is True


def test_t_cdf_of_a_negative_t_is_the_lower_tail() -> None:
    assert t_cdf(-12.706, 1) == pytest.approx(0.025, abs=1e-5) and t_cdf(-2.776, 4) == pytest.approx(0.025, abs=1e-4)
    for df in (1, 3, 30):
        assert t_cdf(-1.3, df) == pytest.approx(1 - t_cdf(1.3, df), abs=1e-12) and t_cdf(-1.3, df) < 0.5


@pytest.fixture
def degenerate_runs(tmp_path: Path) -> Path:
    """none (the baseline) seeds 0-2; ddfp a clear gain and vat a clear loss on seeds 0-2 (intervals that
    exclude 0); dropout seeds 0-1, each +1.00 point (an interval of width 0); noise seed 2 alone (one pair)."""
    root = tmp_path / "runs"
    groups = {
        "none": [0.40, 0.41, 0.50], "ddfp": [0.45, 0.47, 0.55], "vat": [0.37, 0.38, 0.46],
        "dropout": [0.41, 0.42], "noise": [None, None, 0.60],
    }
    for name, scores in groups.items():
        for seed, score in enumerate(scores):
            if score is not None:
                write_run(root, name, seed, {"name": name}, score, final=score - 0.01)
    return root


DDFP_MARKDOWN_ROW = (  # as before issue 34: a normal interval is shown as it was
    "| ddfp | 49.00 ± 5.29 | 48.00 ± 5.29 | 3 | +5.33 | +5.33 ± 0.58 | 3 | [+3.90, +6.77] | 0: +5.00, 1: +6.00, 2: +5.00 | CI excludes 0 |"
)


@pytest.mark.parametrize("output", ["table", "md", "latex", "csv", "json"])
def test_every_format_marks_a_degenerate_or_one_pair_interval_and_never_says_it_excludes_zero(
    degenerate_runs: Path, output: str, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = run_cli(["compare", str(degenerate_runs), "--format", output], capsys)
    assert code == 0 and err == "" and "nan" not in out.lower()
    if output in ("table", "md", "latex"):
        lines = out.splitlines()
        row = {name: next(line for line in lines if name in line) for name in ("ddfp", "dropout", "noise", "vat")}
        assert "[+3.90, +6.77]" in row["ddfp"] and "[-4.77, -1.90]" in row["vat"]
        assert "degenerate: all 2 differences equal" in row["dropout"] and "[+1.00, +1.00]" not in out
        assert "n/a (1 pair)" in row["noise"]
        if output == "latex":
            assert row["ddfp"].endswith("& [+3.90, +6.77]$^*$ & 0: +5.00, 1: +6.00, 2: +5.00 \\\\")
            assert "$^*$" in row["vat"] and "$^*$" not in row["dropout"] and "$^*$" not in row["noise"]
            assert "& degenerate: all 2 differences equal & 0: +1.00, 1: +1.00 \\\\" in row["dropout"]
        else:
            assert out.count("CI excludes 0") == 2 and "CI excludes 0" in row["ddfp"] and "CI excludes 0" in row["vat"]
            assert "CI excludes 0" not in row["dropout"] and "CI excludes 0" not in row["noise"]
        if output == "md":
            assert row["ddfp"] == DDFP_MARKDOWN_ROW
            assert row["dropout"].split(" | ")[7:] == ["degenerate: all 2 differences equal", "0: +1.00, 1: +1.00", "unequal seeds (2 of 3), baseline seeds missing: 2 |"]
            assert row["noise"].split(" | ")[6:9] == ["**1**", "**n/a (1 pair)**", "**2: +10.00**"]
            assert "n/a for one pair, degenerate when all differences are equal" in out
    elif output == "csv":
        rows = {row["perturbation.name"]: row for row in csv.DictReader(io.StringIO(out))}
        header = out.splitlines()[0].split(",")
        assert header[-11:] == [
            "paired_n", "paired_delta", "paired_std", "ci_low", "ci_high", "ci_excludes_zero",
            "paired_seeds", "deltas", "seeds_only_here", "seeds_only_in_baseline", "ci_status",
        ]
        assert {name: row["ci_status"] for name, row in rows.items()} == {
            "ddfp": "ok", "dropout": "zero_variance", "noise": "one_pair", "none": "", "vat": "ok",
        }
        assert {name: row["ci_excludes_zero"] for name, row in rows.items()} == {
            "ddfp": "True", "dropout": "", "noise": "", "none": "", "vat": "True",
        }
        assert float(rows["dropout"]["ci_low"]) == pytest.approx(0.01) and float(rows["dropout"]["ci_high"]) == pytest.approx(0.01)
        assert float(rows["dropout"]["paired_std"]) < 1e-15 and rows["noise"]["ci_low"] == rows["noise"]["paired_std"] == ""
        assert float(rows["ddfp"]["ci_low"]) == pytest.approx(0.038991157567500864)
    else:
        rows = {row["group"]["perturbation.name"]: row for row in json.loads(out)}
        assert rows["none"]["paired"] is None
        ddfp, dropout, noise, vat = (rows[name]["paired"] for name in ("ddfp", "dropout", "noise", "vat"))
        assert ddfp["ci_status"] == "ok" and ddfp["excludes_zero"] is True and ddfp["ci_low"] == pytest.approx(0.038991157567500864)
        assert vat["ci_status"] == "ok" and vat["excludes_zero"] is True and vat["ci_high"] < 0
        assert dropout["ci_status"] == "zero_variance" and dropout["excludes_zero"] is None and dropout["n"] == 2
        assert dropout["ci_low"] == pytest.approx(0.01) and dropout["ci_high"] == pytest.approx(0.01)
        assert noise["ci_status"] == "one_pair" and noise["excludes_zero"] is None and noise["ci_low"] is None and noise["n"] == 1
