"""The plugin host: discovery, registration, option validation, conformance of every component."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fake_distribution import FakeDistribution
from sandbox.api import ClassifierOutput, PerturbationContext
from sandbox.errors import SandboxError
from sandbox.plugins import build_registry, load_registry, make_plugin_host
from sandbox import __version__
from sandbox.registry import BUILT_IN, ENTRY_POINT, KINDS, PLUGIN, Origin, Registry

BUILTINS = {
    "backbone": {"timm"},
    "density": {"glow"},
    "perturbation": {"ddfp", "dropout", "vat", "noise", "none"},
    "consistency": {"ce"},
    "dataset": {"shapes"},
    "network": {"deeplabv3plus", "smp"},
}

REGISTRY = load_registry()
CONTEXT = {
    "density": {"feature_dim": 8, "num_classes": 3, "total_steps": 10},
    "network": {"num_classes": 3, "build_backbone": lambda: REGISTRY.get("backbone", "timm").build({})},
}
FILE_DATASETS = {"pascal_voc", "cityscapes", "folder"}
SMALL_OPTIONS = {"dataset": {"num_labeled": 2, "num_unlabeled": 2, "num_val": 2, "image_size": 32}}


def test_builtins_arrive_through_the_entry_point_group() -> None:
    for kind, names in BUILTINS.items():
        assert names <= set(REGISTRY.names(kind)), kind
    providers = {c.provider for c in REGISTRY}
    assert all(p.startswith("sandbox-ssl ") for p in providers), providers
    assert REGISTRY.get("perturbation", "ddfp").origin == Origin(BUILT_IN, "sandbox-ssl", __version__, "perturbations")


@pytest.mark.parametrize("component", list(REGISTRY), ids=lambda c: f"{c.kind.name}:{c.name}")
def test_every_component_builds_with_defaults_and_satisfies_its_hookspec(component) -> None:
    if component.kind.name == "dataset" and component.name in FILE_DATASETS:
        pytest.skip("reads a dataset tree from disk: built on generated trees in tests/test_dataset_*.py")
    options = SMALL_OPTIONS.get(component.kind.name, {})
    product = component.build(options, **CONTEXT.get(component.kind.name, {}))
    assert isinstance(product, component.kind.product)
    assert component.description, "every component needs a one-line description"


def test_unknown_name_lists_what_exists() -> None:
    with pytest.raises(SandboxError, match=r"unknown perturbation 'nope'.*ddfp, dropout, noise, none, vat"):
        REGISTRY.get("perturbation", "nope")


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(SandboxError, match=r"unknown option 'epsilon'.*valid options: eps"):
        REGISTRY.get("perturbation", "ddfp").resolve_options({"epsilon": 1.0}, "r.toml: [perturbation]")


def test_option_type_is_checked() -> None:
    with pytest.raises(SandboxError, match=r"\[perturbation\]: p = 'lots'"):
        REGISTRY.get("perturbation", "dropout").resolve_options({"p": "lots"}, "[perturbation]")


def test_a_factory_returning_the_wrong_type_is_an_error() -> None:
    registry = Registry()
    registry.add("perturbation", "bad", lambda: 42, "returns an int", "test")
    with pytest.raises(SandboxError, match="returned int, expected a Perturbation"):
        registry.get("perturbation", "bad").build({})


def test_duplicate_names_name_both_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dup_plugin.py").write_text(textwrap.dedent("""
        from sandbox.api import hookimpl
        from sandbox_builtins.perturbations import NoPerturbation
        @hookimpl
        def sandbox_register_perturbations(register):
            register("none", NoPerturbation)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SandboxError, match=r"'none' is registered twice: by sandbox-ssl .* and by dup_plugin"):
        load_registry(["dup_plugin"])


THIRD_PARTY = """
import torch
from sandbox.api import Perturbation, hookimpl

class Shake(Perturbation):
    '''Adds a constant to every feature.'''
    def __init__(self, amount: float = 1.0) -> None:
        super().__init__()
        self.amount = amount
    def forward(self, features, context):
        return features + self.amount

@hookimpl
def sandbox_register_perturbations(register):
    register("shake", Shake)
"""


def test_third_party_plugin_is_discovered_from_an_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shake_plugin.py").write_text(THIRD_PARTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [*real(), FakeDistribution("shake_plugin")])
    registry = build_registry(make_plugin_host())
    component = registry.get("perturbation", "shake")
    assert component.provider == "shake-plugin 1.2.3"
    assert component.origin == Origin(ENTRY_POINT, package="shake-plugin", version="1.2.3", entry_point="shake")
    assert component.description == "Adds a constant to every feature."
    shake = component.build({"amount": 2.0})
    context = PerturbationContext(lambda x: ClassifierOutput(x, x), torch.ones(1, 2, 2, dtype=torch.bool))
    assert torch.equal(shake(torch.zeros(1, 3, 2, 2), context), torch.full((1, 3, 2, 2), 2.0))


def test_plugin_from_a_py_file(tmp_path: Path) -> None:
    path = tmp_path / "shake_file.py"
    path.write_text(THIRD_PARTY)
    registry = load_registry([str(path)])
    assert registry.get("perturbation", "shake").provider == "shake_file"
    assert registry.get("perturbation", "shake").origin == Origin(PLUGIN, plugin=str(path.resolve()))
    sys.modules.pop("shake_file", None)


def test_a_plugin_that_fails_to_import_is_named() -> None:
    with pytest.raises(SandboxError, match=r"plugin module 'no_such_module_xyz' failed to import"):
        load_registry(["no_such_module_xyz"])


def test_every_kind_has_a_documented_hookspec() -> None:
    from sandbox import hookspecs

    for kind in KINDS.values():
        spec = getattr(hookspecs, kind.hook)
        assert spec.__doc__ and "register" in spec.__doc__.lower()
