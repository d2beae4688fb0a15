"""The packages of ``sandbox`` import downwards only: a module may import its own layer and those below.

Every import counts, those inside functions included (a lazy import is still a dependency); only
imports under ``if TYPE_CHECKING:`` (annotations) are left out. The order, lowest first, is
:data:`LAYERS`; each package's ``__init__`` docstring says what lives there and what it may import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SANDBOX = Path(__file__).resolve().parents[1] / "sandbox"

LAYERS: list[tuple[str, ...]] = [
    ("sandbox", "sandbox.errors", "sandbox.host_side", "sandbox.renamed_values", "sandbox.disk"),
    ("sandbox.api", "sandbox.weights_files", "sandbox.hookspecs", "sandbox.registry"),
    ("sandbox.rundir",),
    ("sandbox.processes",),
    ("sandbox.recipe", "sandbox.plugins"),
    ("sandbox.data",),
    ("sandbox.density",),
    ("sandbox.train",),
    ("sandbox.analysis", "sandbox.bench"),
    ("sandbox.sweep",),
    ("sandbox.cli", "sandbox.__main__"),
]
"""The layers, lowest first: modules (``sandbox.recipe``) or packages (``sandbox.train``, every module in it)."""

ONLY_IMPORTED_BY = {"sandbox.sweep": ("sandbox.sweep", "sandbox.cli.ablate")}
"""Packages that only the named modules (or packages) may import."""


def module_name(path: Path) -> str:
    parts = path.relative_to(SANDBOX.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The layer of ``module`` (the longest matching entry of :data:`LAYERS`), None outside ``sandbox``."""
    best: tuple[int, int] | None = None
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry or (entry != "sandbox" and module.startswith(entry + ".")):
                if best is None or len(entry) > best[1]:
                    best = (index, len(entry))
    if best is None and (module == "sandbox" or module.startswith("sandbox.")):
        raise AssertionError(f"{module} is in no layer of LAYERS: add it")
    return None if best is None else best[0]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``sandbox`` import of the module at ``path``."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``sandbox`` import in ``source`` (module ``module``) outside ``if
    TYPE_CHECKING:`` blocks; ``from sandbox import api`` names ``sandbox.api``."""
    tree = ast.parse(source)
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "sandbox"]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            name = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            if name.split(".")[0] == "sandbox":
                found += [(node.lineno, f"{name}.{alias.name}" if is_module(f"{name}.{alias.name}") else name)
                          for alias in node.names]
    return found


def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of ``sandbox``."""
    relative = Path(*name.split("."))
    return (SANDBOX.parent / relative).with_suffix(".py").is_file() or (SANDBOX.parent / relative / "__init__.py").is_file()


MODULES = sorted(SANDBOX.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    assert MODULES
    for path in MODULES:
        assert layer_of(module_name(path)) is not None


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_a_module_imports_its_own_layer_and_those_below(path: Path) -> None:
    own = layer_of(module_name(path))
    assert own is not None
    upward = [f"line {line}: {name} (layer {layer_of(name)} > {own})" for line, name in imports_of(path)
              if (layer_of(name) or 0) > own]
    assert not upward, f"{module_name(path)} imports a higher layer: " + "; ".join(upward)


def test_only_ablate_imports_the_sweep_package() -> None:
    for path in MODULES:
        importer = module_name(path)
        for line, name in imports_of(path):
            for package, allowed in ONLY_IMPORTED_BY.items():
                if name == package or name.startswith(package + "."):
                    assert any(importer == a or importer.startswith(a + ".") for a in allowed), (
                        f"{importer} line {line} imports {name}: only {', '.join(allowed)} may")


def test_the_layer_check_sees_a_lazy_upward_import_and_skips_annotations() -> None:
    """The check can fail: a function's import of ``sandbox.train`` in a ``rundir`` module is found and is
    upward; an import under ``TYPE_CHECKING`` is not counted."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sandbox.sweep.grid import Run\n"
              "def f():\n    from sandbox.train.loop import Trainer\n    from sandbox import errors\n")
    found = imports_in(source, "sandbox.rundir.probe", is_package=False)
    assert found == [(5, "sandbox.train.loop"), (6, "sandbox.errors")]
    assert layer_of("sandbox.train.loop") > layer_of("sandbox.rundir.probe") > layer_of("sandbox.errors")
