"""Recipes: loading, inheritance, overrides, validation messages, resolution of every recipe."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sandbox.errors import SandboxError
from sandbox.plugins import load_registry
from sandbox.recipe import load_recipe, resolve_components

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))
REGISTRY = load_registry()


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_resolves(path: Path) -> None:
    recipe = resolve_components(load_recipe(path), REGISTRY, str(path))
    assert recipe.name


PER_PROCESS_NORMALISATION = {
    "ddfp_pascal", "ddfp_cityscapes", "ddfp_dropout_pascal", "supervised_pascal", "ddfp_dinov2_pascal",
    "unimatch_pascal", "unimatch_ddfp_pascal", "unimatch_v2_pascal", "unimatch_v2_cityscapes", "unimatch_v2_ddfp_pascal",
}
"""The recipes that follow a paper's code (DDFP's train_ddfp_*.py, UniMatch's unimatch.py, UniMatch V2's
unimatch_v2.py), or derive from one: each loss divided by its GPU's own pixel count, as on their GPUs."""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_paper_recipes_normalise_each_process_by_its_own_pixel_count(path: Path) -> None:
    """``train.loss_pixel_count``: ``per_process`` in the paper recipes, ``global`` (N processes = one) in
    the generated-data ones."""
    expected = "per_process" if path.stem in PER_PROCESS_NORMALISATION else "global"
    assert load_recipe(path).train.loss_pixel_count == expected
    assert PER_PROCESS_NORMALISATION <= {recipe.stem for recipe in RECIPES}


def test_resolved_recipe_fills_plugin_defaults_and_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path, '[dataset]\nname = "shapes"\n')
    resolved = resolve_components(load_recipe(path), REGISTRY)
    data = tomllib.loads(resolved.to_toml())
    assert data["name"] == "r"
    assert data["perturbation"] == {"name": "ddfp", "eps": 4.0, "norm": "l2"}
    assert data["density"]["sampled_pixels"] == 20480
    assert data["train"]["ema_decay"] == 0.999
    again = write(tmp_path, resolved.to_toml(), "again.toml")
    assert resolve_components(load_recipe(again), REGISTRY).to_toml() == resolved.to_toml()


def test_overrides_parse_toml_values_and_strings(tmp_path: Path) -> None:
    path = write(tmp_path, '[dataset]\nname = "shapes"\n[perturbation]\nname = "ddfp"\neps = 2.0\n')
    recipe = load_recipe(path, ["train.iters=50", "train.warmup_iters=5", "model.aspp_dilations=[1,2,3]", "train.mixed_precision=bf16"])
    assert recipe.train.iters == 50 and recipe.model.aspp_dilations == [1, 2, 3]
    assert recipe.train.mixed_precision == "bf16"
    switched = resolve_components(load_recipe(path, ["perturbation.name=dropout"]), REGISTRY)
    assert switched.perturbation.options() == {"p": 0.5}, "ddfp's eps must not leak into dropout"


def test_base_recipe_inheritance(tmp_path: Path) -> None:
    write(tmp_path, '[dataset]\nname = "shapes"\nimage_size = 40\n[train]\niters = 7\nwarmup_iters = 3\nlr = 0.5\n', "base.toml")
    child = write(tmp_path, 'base = "base.toml"\n[train]\niters = 9\n', "child.toml")
    recipe = load_recipe(child)
    assert (recipe.train.iters, recipe.train.lr, recipe.name) == (9, 0.5, "child")
    assert recipe.dataset.options() == {"image_size": 40}


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("[dataset\n", [], r"r\.toml: invalid TOML"),
        ('[dataset]\nname = "shapes"\n[train]\nitres = 5\n', [], r"r\.toml: unknown key 'train\.itres'"),
        ('[dataset]\nname = "shapes"\n[train]\niters = "many"\n', [], r"r\.toml: train\.iters = 'many': input should be a valid integer"),
        ('[dataset]\nname = "shapes"\n', ["train.iters=-1"], r"train\.iters = -1: input should be greater than 0"),
        ('[dataset]\nname = "shapes"\n', ["train.mixed_precision=fp8"], r"train\.mixed_precision = 'fp8'"),
        ("seed = 1\n", [], r"r\.toml: missing key 'dataset'"),
        ('[dataset]\nname = "shapes"\n', ["train.iters"], r"--set 'train\.iters': expected KEY=VALUE"),
        ('seed = 1\n[dataset]\nname = "shapes"\n', ["seed.x=1"], r"'seed' is a value, not a table"),
    ],
)
def test_validation_errors_name_file_key_value_and_expectation(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(SandboxError, match=message):
        load_recipe(write(tmp_path, text), overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["perturbation.name=wobble"], r"\[perturbation\] name = 'wobble': unknown perturbation; registered: complementary_dropout, ddfp, dropout, noise, none, vat"),
        (["perturbation.epsilon=3"], r"\[perturbation\]: unknown option 'epsilon' for perturbation 'ddfp'; valid options: eps"),
        (["density.blocks=two"], r"\[density\]: blocks = 'two'"),
        (["consistency.strong.name=kl2"], r"\[consistency\.strong\] name = 'kl2'"),
    ],
)
def test_component_errors_name_the_table_and_list_what_exists(tmp_path: Path, overrides: list[str], message: str) -> None:
    path = write(tmp_path, '[dataset]\nname = "shapes"\n')
    with pytest.raises(SandboxError, match=message):
        resolve_components(load_recipe(path, overrides), REGISTRY, str(path))


def test_missing_recipe_file() -> None:
    with pytest.raises(SandboxError, match="recipe nowhere.toml does not exist"):
        load_recipe("nowhere.toml")


def test_an_old_option_value_still_works_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sandbox.analysis.runs import read_run
    from sandbox.recipe import _NOTED
    from sandbox.rundir.directory import RunDirectory

    path = tmp_path / "old.toml"
    path.write_text(f'name = "old"\noutput_dir = "{tmp_path.as_posix()}"\n[dataset]\nname = "shapes"\n'
                    '[train]\nunsupervised_normalisation = "valid"\n')
    _NOTED.clear()
    recipe = load_recipe(path)
    load_recipe(path)
    assert recipe.train.unsupervised_normalisation == "image_pixels"
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == [f"note: {path}: train.unsupervised_normalisation = 'valid' is now called 'image_pixels'; "
                     "the old name still works"], "one line, once"
    assert load_recipe(path, ["train.unsupervised_normalisation=trusted"]).train.unsupervised_normalisation == "trusted_pixels"
    # A run saved under the old name resumes with today's recipe and groups with runs saved after the rename.
    run_dir = RunDirectory.for_recipe(recipe)
    run_dir.path.mkdir(parents=True)
    run_dir.recipe_file.write_text(recipe.to_toml().replace('"image_pixels"', '"valid"'))
    run_dir.prepare(recipe, resume=True, overwrite=False)
    assert read_run(run_dir.path).recipe["train.unsupervised_normalisation"] == "image_pixels"


def test_a_recipe_without_a_name_is_named_by_its_file_not_by_its_base(tmp_path: Path) -> None:
    """The README's rule (``name`` defaults to the file stem) holds for a recipe with a ``base``: before,
    it took its base's name, so its run went into the base's run folder (and ``--overwrite`` would
    have deleted the base's run)."""
    from conftest import write_tiny_recipe

    base = write_tiny_recipe(tmp_path)
    child = tmp_path / "lower_lr.toml"
    child.write_text(f'base = "{base.name}"\n[train]\nlr = 0.001\n')
    assert load_recipe(base).name == "tiny" and load_recipe(child).name == "lower_lr"
    named = tmp_path / "named.toml"
    named.write_text(f'base = "{base.name}"\nname = "mine"\n')
    assert load_recipe(named).name == "mine"


def test_true_or_false_for_a_number_is_refused(tiny_recipe: Path) -> None:
    """``iters = true`` was read as 1 and ``threshold = false`` as 0.0, without a word."""
    for key in ("train.iters=true", "train.threshold=false", "eval.batch_size=true"):
        with pytest.raises(SandboxError, match=rf"{key.split('=')[0]} = \w+: expected a number, not {key.split('=')[1]}"):
            load_recipe(tiny_recipe, [key])
    assert load_recipe(tiny_recipe, ["train.sync_bn=false"]).train.sync_bn is False, "a boolean setting takes one"
