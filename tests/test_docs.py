"""The README stays true: hooks and recipe keys documented, CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sandbox import hookspecs
from sandbox.plugins import load_registry
from sandbox.recipe import EvalSection, Recipe, TrainSection
from sandbox.registry import KINDS

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert len(commands) == 2, "the README holds exactly two set-up commands"
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [commands[1]]
    assert "sandbox run recipes/quickstart.toml" in commands[0]


@pytest.mark.parametrize("kind", list(KINDS.values()), ids=lambda k: k.name)
def test_every_hook_is_documented(kind) -> None:
    assert f"`{kind.hook}`" in README
    assert getattr(hookspecs, kind.hook).__doc__


@pytest.mark.parametrize(
    "key",
    [*Recipe.model_fields, *TrainSection.model_fields, *EvalSection.model_fields],
)
def test_every_recipe_key_is_documented(key: str) -> None:
    assert f"`{key}`" in README or f"[{key}" in README, key


def test_every_toml_example_is_valid_toml() -> None:
    import tomllib

    blocks = re.findall(r"```toml\n(.*?)\n```", README, flags=re.S)
    assert blocks, "the README shows TOML examples"
    for block in blocks:
        tomllib.loads(block)


def test_the_plugin_option_is_listed_for_every_command_that_takes_it() -> None:
    table = README[README.index("## Commands"):README.index("### The run directory")]
    for command in ("run", "eval", "bench", "ablate", "plot", "predict"):
        rows = [line for line in table.splitlines() if line.startswith(f"| `sandbox {command} ")]
        assert rows and all("--plugin" in row for row in rows), command


@pytest.mark.parametrize("network", ["deeplabv3plus", "smp"])
def test_every_option_of_the_built_in_networks_is_documented(network: str) -> None:
    for option in load_registry().get("network", network).option_names():
        assert f"`{option}`" in README, f"[model] {network}: {option}"
