"""Packaging: every package is installed, under a name of its own, and every import is declared."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def source_packages() -> set[str]:
    """Every package under ``sandbox/`` and ``plugins/``, named as it installs."""
    names = set()
    for init in ROOT.glob("sandbox/**/__init__.py"):
        names.add(".".join(init.parent.relative_to(ROOT).parts))
    for init in ROOT.glob("plugins/**/__init__.py"):
        names.add(".".join(("sandbox_builtins", *init.parent.relative_to(ROOT / "plugins").parts)))
    return names


def test_every_package_is_installed_and_the_built_ins_are_not_a_top_level_plugins_package() -> None:
    assert set(SETUPTOOLS["packages"]) == source_packages()
    assert SETUPTOOLS["package-dir"] == {"sandbox_builtins": "plugins"}
    assert {name.split(".")[0] for name in SETUPTOOLS["packages"]} == {"sandbox", "sandbox_builtins"}


def test_every_built_in_entry_point_names_an_importable_module_of_the_built_ins() -> None:
    entry_points = PYPROJECT["project"]["entry-points"]["sandbox"]
    modules = {path.stem for path in (ROOT / "plugins").glob("*.py")} - {"__init__"}
    for name, target in entry_points.items():
        assert target.startswith("sandbox_builtins."), name
        assert importlib.import_module(target).__file__.startswith(str(ROOT / "plugins")), target
    registered = {target.split(".")[1] for target in entry_points.values()}
    assert registered == modules, "every built-in module is a plugin: shared helpers live in public sandbox modules"


HOST_INTERNALS = ("sandbox.train", "sandbox.cli", "sandbox.analysis", "sandbox.sweep", "sandbox.bench")
"""The host's own packages: a plugin (built-in or third-party) never needs them."""


def test_the_built_ins_import_no_other_built_in_and_only_the_public_api() -> None:
    """A built-in is written as a third party would write it: it imports the public ``sandbox``
    modules (``sandbox.api``, ``sandbox.density``, ``sandbox.data.segmentation_files``,
    ``sandbox.weights_files``, ...), never another built-in or the host's internals."""
    for path in (ROOT / "plugins").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] if node.level == 0 else [f"relative import (level {node.level})"]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                assert not module.startswith(("sandbox_builtins", "plugins", "relative")), f"{path.name} imports {module}"
                assert not module.startswith(HOST_INTERNALS), f"{path.name} imports the host's {module}"


def imported_top_level_modules() -> set[str]:
    """Top-level names of every module imported by the host and the built-ins."""
    names = set()
    for path in [*ROOT.glob("sandbox/**/*.py"), *ROOT.glob("plugins/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_library_is_a_declared_dependency() -> None:
    declared = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    third_party = imported_top_level_modules() - set(sys.stdlib_module_names) - {"sandbox", "sandbox_builtins"}
    assert third_party, "the scan found the imports"
    undeclared = {}
    for module in sorted(third_party):
        names = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        if not names & declared:
            undeclared[module] = sorted(names)
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
