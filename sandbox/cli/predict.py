"""``sandbox predict``: class masks (palette PNGs) and overlays for any images, from saved weights."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from PIL import Image

from sandbox.analysis.colours import colourize, overlay, palette_image
from sandbox.cli.common import PluginOption, RecipeArgument, SetOption, writing_to

if TYPE_CHECKING:
    from sandbox.analysis.inference import Predictor

MASKS_FOLDER = "masks"
"""Sub-folder of ``--out`` for the palette masks (``<image stem>.png``)."""

OVERLAYS_FOLDER = "overlays"
"""Sub-folder of ``--out`` for the image blended with its mask's colours."""


def predict(
    recipe: Path = RecipeArgument,
    images: List[Path] = typer.Argument(..., help="Image files (jpg/png) or folders of them.", show_default=False),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Weights file: a run's best.pt or last.pt."),
    out: Path = typer.Option(..., "--out", help="Output folder: masks/ and overlays/ go here."),
    set_: Optional[List[str]] = SetOption,
    plugin: Optional[List[str]] = PluginOption,
) -> None:
    """Write a palette PNG mask (pixel = class id) and an RGB overlay per image.

    Images larger than the recipe's eval crop are predicted with sliding windows.
    """
    from sandbox.analysis.inference import collect_images, load_predictor
    from sandbox.plugins import load_run_recipe

    files = collect_images(list(images))
    resolved, registry = load_run_recipe(recipe, set_, plugin, beside=[checkpoint.parent])
    predictor = load_predictor(resolved, registry, checkpoint)
    folders = [out / MASKS_FOLDER, out / OVERLAYS_FOLDER]
    created = [folder for folder in (out, *folders) if not folder.exists()]
    with writing_to(out):  # an --out that cannot be written fails before any image is predicted
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
    try:
        write_predictions(files, predictor, out)
    except BaseException:
        remove_if_empty(created)
        raise


def write_predictions(files: List[Path], predictor: Predictor, out: Path) -> None:
    """Predict each image of ``files`` and write its mask and overlay under ``out``."""
    from sandbox.analysis.inference import read_image

    palette = predictor.palette
    for path in files:
        image = read_image(path)
        mask, sliding = predictor.predict_image(image)
        mask_path = out / MASKS_FOLDER / f"{path.stem}.png"
        overlay_path = out / OVERLAYS_FOLDER / f"{path.stem}.png"
        blended = overlay(image.permute(1, 2, 0).numpy(), colourize(mask, palette))
        with writing_to(out):
            palette_image(mask, palette).save(mask_path)
            Image.fromarray(blended).save(overlay_path)
        how = "sliding windows" if sliding else "whole image"
        typer.echo(f"{path} ({image.shape[-1]}x{image.shape[-2]}, {how}) -> {mask_path}, {overlay_path}")


def remove_if_empty(folders: List[Path]) -> None:
    """Remove those of ``folders`` (created by this command, parents first) that still hold nothing:
    a failed ``predict`` leaves no empty output folders behind."""
    for folder in reversed(folders):
        with suppress(OSError):
            folder.rmdir()
