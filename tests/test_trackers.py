"""Trackers: TensorBoard shows one value per step after any number of resumes (read with its own
reader); a tracker whose package is missing is a one-line error before anything is written."""

from __future__ import annotations

import json
import re
import shutil
import typing
from pathlib import Path

import pytest

from sandbox.cli import main
from sandbox.recipe import TrainSection

README = Path(__file__).resolve().parents[1] / "README.md"


def cli(*args: str) -> None:
    """Run the CLI in this process; it must succeed."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 0


def scalars_by_tag(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under ``log_dir`` as TensorBoard's own reader shows it: ``(step, value)`` per tag, in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def logged_value(records: list[dict], tag: str, step: int) -> float:
    """The value of ``tag`` at ``step`` in ``metrics.jsonl`` (``val_iou/<class>`` from ``val_per_class_iou``)."""
    for record in records:
        if record["step"] != step:
            continue
        if tag.startswith("val_iou/") and "val_per_class_iou" in record:
            return record["val_per_class_iou"][tag.removeprefix("val_iou/")]
        if tag in record:
            return record[tag]
    raise AssertionError(f"{tag} at step {step} is not in metrics.jsonl")


def test_tensorboard_shows_one_value_per_step_after_resumes(trained_tiny_run: Path) -> None:
    """The session's tiny run (checkpoints at steps 3 and 6), given a TensorBoard tracker, killed after
    its step-6 evaluation and resumed from step 3, twice (each resume logs steps 4 to 6 again), then
    resumed once finished."""
    pytest.importorskip("tensorboard")
    run_dir = trained_tiny_run
    recipe = run_dir / "recipe.toml"
    text = recipe.read_text()
    assert text.count("\ntrackers = []\n") == 1
    recipe.write_text(text.replace("\ntrackers = []\n", '\ntrackers = [\n    "tensorboard",\n]\n'))  # as saved
    for _ in range(2):
        shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
        (run_dir / "summary.json").unlink()
        (run_dir / "last.pt").unlink()
        cli("run", str(recipe), "--resume")
    cli("run", str(recipe), "--resume")  # of the finished run: evaluates the final model again, logs nothing
    log_dir = run_dir / "tiny"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 3, "each resume wrote its events"

    scalars = scalars_by_tag(log_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss_perturbed", "perturbation_relative_norm", "val_miou", "val_iou/background"} <= set(scalars)
    for tag, events in scalars.items():
        steps = [step for step, _ in events]
        assert steps == sorted(set(steps)), f"{tag}: one value per step, steps increasing: {steps}"
        assert steps[-1] == 6, tag
        for step, value in events:
            assert value == pytest.approx(logged_value(records, tag, step), rel=1e-6, abs=1e-7), (tag, step)


def test_a_tracker_whose_package_is_missing_is_one_line_before_anything_is_written(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import accelerate.tracking
    from accelerate.utils import LoggerType

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])  # no wandb here
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--set", 'train.trackers=["tensorboard", "wandb"]'])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err == ("error: train.trackers: 'wandb' needs the package wandb, which is not installed "
                   "(pip install wandb, or remove 'wandb' from train.trackers)")
    assert not (tmp_path / "runs").exists(), "nothing written"


def test_the_readme_names_the_package_of_every_tracker() -> None:
    """Every tracker a recipe may name, in the README's table of trackers with the package it needs."""
    from sandbox.train.accelerator import TRACKER_PACKAGES

    names = typing.get_args(typing.get_args(TrainSection.model_fields["trackers"].annotation)[0])
    assert set(names) == set(TRACKER_PACKAGES)
    text = README.read_text()
    for name in names:
        assert re.search(rf"^\| `{name}` \| `{re.escape(TRACKER_PACKAGES[name])}` \|", text, re.MULTILINE), name
