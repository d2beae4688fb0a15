"""``sandbox plot`` and ``sandbox predict`` on a fabricated run (weights of an untrained tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sandbox.analysis.colours import palette_image
from sandbox.analysis.curves import DPI, FIGURE_INCHES
from sandbox.analysis.prediction_grid import CELL_INCHES, grid_inches, plot_prediction_grid
from sandbox.cli import main
from sandbox.plugins import load_registry
from sandbox.recipe import load_recipe, resolve_components
from sandbox.train.builder import build_dataset, build_model

SHORT = ["--set", "train.iters=2", "--set", "train.warmup_iters=2"]
METRICS = [
    {"step": 2, "loss": 1.5, "loss_sup": 1.5, "lr": 0.01, "density_nll": 3.0},
    {"step": 2, "val_miou": 0.2, "val_per_class_iou": {"background": 0.9, "disc": None}},
    {"step": 4, "loss": 1.1, "loss_sup": 1.0, "lr": 0.005, "density_nll": 2.0},
    {"step": 4, "val_miou": 0.3, "val_per_class_iou": {"background": 0.95, "disc": 0.1}},
]


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def pixel_size(inches: tuple[float, float]) -> tuple[int, int]:
    return round(inches[0] * DPI), round(inches[1] * DPI)


@pytest.fixture
def run(tiny_recipe: Path) -> Path:
    """A run folder with recipe.toml, metrics.jsonl and best.pt (untrained weights)."""
    registry = load_registry()
    recipe = resolve_components(load_recipe(tiny_recipe, SHORT[1::2]), registry)
    path = tiny_recipe.parent / "runs" / "tiny" / "seed3"
    path.mkdir(parents=True)
    (path / "recipe.toml").write_text(recipe.to_toml())
    (path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in METRICS))
    model = build_model(recipe, registry, build_dataset(recipe, registry).num_classes)
    torch.save({"model": model.state_dict(), "step": 2}, path / "best.pt")
    return path


def test_plot_writes_curves_and_prediction_grids(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other" / "seed0"  # metrics only: curves overlaid, no prediction grid
    other.mkdir(parents=True)
    (other / "recipe.toml").write_text((run / "recipe.toml").read_text())
    (other / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 2.0, "lr": 0.02}) + "\n")
    out = tmp_path / "plots"
    code, stdout, _ = run_cli(["plot", str(run), str(other), "--out", str(out), "--images", "2"], capsys)
    assert code == 0
    curves = sorted(path.name for path in (out / "curves").iterdir())
    assert curves == sorted(
        ["loss.png", "loss_sup.png", "lr.png", "density_nll.png", "val_miou.png",
         "val_per_class_iou.background.png", "val_per_class_iou.disc.png"]
    )
    for name in curves:
        with Image.open(out / "curves" / name) as image:
            assert image.format == "PNG" and image.size == pixel_size(FIGURE_INCHES)
    grids = list((out / "predictions").iterdir())
    assert len(grids) == 1 and "no best.pt or last.pt" in stdout
    with Image.open(grids[0]) as image:
        assert image.format == "PNG" and image.size == pixel_size(grid_inches(2, 5))


def test_runs_whose_names_differ_only_in_other_scripts_get_their_own_grids(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``a ü`` and ``a 名`` were both written as ``a___seed0.png``: one grid overwrote the other."""
    runs = []
    for name in ("a ü", "a 名", "a_名"):
        copy = tmp_path / "runs" / name / "seed0"
        copy.mkdir(parents=True)
        for file in ("recipe.toml", "metrics.jsonl", "best.pt"):
            (copy / file).write_bytes((run / file).read_bytes())
        runs.append(copy)
    out = tmp_path / "plots"
    code, stdout, _ = run_cli(["plot", *map(str, runs), "--out", str(out), "--images", "1"], capsys)
    assert code == 0
    grids = sorted(path.name for path in (out / "predictions").iterdir())
    assert len(grids) == 3, grids
    assert "a_ü_seed0.png" in grids and sum(name.startswith("a_名_seed0-") for name in grids) == 2, grids


def test_prediction_grid_draws_masks_in_the_palette(tmp_path: Path) -> None:
    palette = [(0, 0, 0), (230, 25, 75), (145, 200, 30)]
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    truth, predicted = np.ones((16, 16), dtype=np.int64), np.full((16, 16), 2, dtype=np.int64)
    path = plot_prediction_grid([(image, truth, predicted)], palette, ["a", "b", "c"], 255, tmp_path / "g.png")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    cell = round(CELL_INCHES * DPI) ** 2 // 4  # a quarter of a cell's pixels at least
    assert pixels.shape[:2] == pixel_size(grid_inches(1, 3))[::-1]
    assert np.all(pixels == palette[1], axis=-1).sum() > cell
    assert np.all(pixels == palette[2], axis=-1).sum() > cell


def test_predict_writes_palette_masks_and_overlays(run: Path, tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"wide": (50, 80), "small": (24, 20)}  # (height, width); the eval crop is 32
    Image.fromarray(rng.integers(0, 255, (*sizes["wide"], 3), dtype=np.uint8)).save(images / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (*sizes["small"], 3), dtype=np.uint8)).save(images / "small.png")
    out = tmp_path / "out"
    args = ["predict", str(run / "recipe.toml"), "--checkpoint", str(run / "best.pt"), str(images), "--out", str(out)]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    assert "wide.jpg (80x50, sliding windows)" in stdout and "small.png (20x24, whole image)" in stdout
    shapes_palette = [0, 0, 0, 230, 25, 75, 145, 200, 30, 0, 170, 190, 145, 30, 180]
    for name, (height, width) in sizes.items():
        with Image.open(out / "masks" / f"{name}.png") as mask:
            assert mask.mode == "P" and mask.size == (width, height)
            assert mask.getpalette()[: len(shapes_palette)] == shapes_palette
            assert np.asarray(mask).max() < 5
        with Image.open(out / "overlays" / f"{name}.png") as blended:
            assert blended.mode == "RGB" and blended.size == (width, height)


def test_palette_image_keeps_class_ids() -> None:
    mask = np.array([[0, 1], [2, 4]])
    image = palette_image(mask, [(0, 0, 0), (1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12)])
    assert image.mode == "P" and np.array_equal(np.asarray(image), mask)
    assert image.getpalette()[:6] == [0, 0, 0, 1, 2, 3]


def test_predict_errors_are_one_line(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    base = ["predict", str(run / "recipe.toml"), "--out", str(tmp_path / "out")]
    cases = {
        ("--checkpoint", str(run / "best.pt"), str(tmp_path / "missing.png")): "does not exist",
        ("--checkpoint", str(run / "best.pt"), str(tmp_path / "empty")): "holds no",
        ("--checkpoint", str(run / "best.pt"), str(tmp_path / "bad.png")): "could not be read",
        ("--checkpoint", str(tmp_path / "nope.pt"), str(tmp_path / "bad.png")): "checkpoint",
    }
    for extra, message in cases.items():
        code, _, err = run_cli([*base, *extra], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_truncated_metrics_line_is_named_and_one_run_has_a_legend(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line cut short by a kill was skipped without a word, and a figure of one run had no legend."""
    from sandbox.analysis import curves

    run = tmp_path / "runs" / "killed" / "seed0"
    run.mkdir(parents=True)
    (run / "recipe.toml").write_text('name = "killed"\n')
    records = [{"step": 2, "loss": 1.5}, {"step": 2, "val_miou": 0.2}, {"step": 4, "loss": 1.1}, {"step": 4, "val_miou": 0.3}]
    lines = [json.dumps(record) for record in records]
    (run / "metrics.jsonl").write_text("\n".join([*lines[:3], lines[3][:20]]))  # the last line cut short, no newline
    figures, figure_class = [], curves.Figure

    def recorded(*args: object, **kwargs: object) -> object:
        figures.append(figure_class(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(curves, "Figure", recorded)
    code, stdout, stderr = run_cli(["plot", str(run), "--out", str(tmp_path / "plots"), "--images", "0"], capsys)
    assert code == 0 and "curves of 1 runs" in stdout
    assert stderr.splitlines() == [
        f"warning: {run / 'metrics.jsonl'}:4: skipped a line that is not a metrics record (cut short by a kill?): "
        f"{lines[3][:20]}"
    ]
    assert sorted(figure.axes[0].get_title() for figure in figures) == ["loss", "val_miou"]
    for figure in figures:  # val_miou has its step-2 point: the cut line held step 4's
        legend = figure.axes[0].get_legend()
        assert legend is not None and [text.get_text() for text in legend.get_texts()] == ["killed/seed0"]


def test_predict_draws_masks_in_the_palette_of_the_datasets_own_masks(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A folder dataset of paletted mask PNGs: predicted masks use their colours, not the VOC map."""
    own = [(12, 34, 56), (250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(1)
    for number in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(data / "images" / f"i{number}.png")
        mask = Image.fromarray(rng.integers(0, 5, (24, 24), dtype=np.uint8)).convert("P")
        mask.putpalette([channel for colour in own for channel in colour])
        mask.save(data / "masks" / f"i{number}.png")
    out = tmp_path / "out"
    dataset = ["--set", "dataset.name=folder", "--set", f"dataset.root={data}",
               "--set", 'dataset.class_names=["a", "b", "c", "d", "e"]']
    args = ["predict", str(run / "recipe.toml"), *dataset, "--checkpoint", str(run / "best.pt"), str(data / "images" / "i0.png"),
            "--out", str(out)]
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    with Image.open(out / "masks" / "i0.png") as mask:
        assert mask.getpalette()[:15] == [channel for colour in own for channel in colour]
