"""A run records where each component came from (``provenance.json``), and loading a run whose
component is gone here names the package and version (or the ``--plugin``) the run took it from."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from fake_distribution import FakeDistribution
from sandbox import __version__
from sandbox.cli import main

PROVENANCE_FILE = "provenance.json"
"""Where a run records its components' origins (the README's name: :data:`sandbox.rundir.files.PROVENANCE_FILE`)."""

SHAKE = '''
import torch
from sandbox.api import Perturbation, hookimpl


class Shake(Perturbation):
    """Adds a little noise to the features."""

    def forward(self, features, context):
        return features + 0.1 * torch.randn_like(features)


@hookimpl
def sandbox_register_perturbations(register):
    register("{name}", Shake)
'''

SQUARED = '''
from sandbox.api import ConsistencyLoss, hookimpl, masked_mean


class Squared(ConsistencyLoss):
    """Squared difference of the probabilities."""

    def forward(self, logits, target_probs, valid):
        return masked_mean(((logits.float().softmax(1) - target_probs) ** 2).sum(1), valid)


@hookimpl
def sandbox_register_consistency_losses(register):
    register("squared", Squared)
'''

SHORT_RUN = ["--set", "train.iters=2", "--set", "train.warmup_iters=1", "--set", "train.eval_every=2",
             "--set", "train.checkpoint_every=2"]
"""Two steps (one semi-supervised, with the perturbation), one evaluation and one checkpoint."""


REAL_DISTRIBUTIONS = importlib.metadata.distributions
"""The installed distributions, before any test fakes more."""


def install(monkeypatch: pytest.MonkeyPatch, *fakes: FakeDistribution) -> None:
    """Make ``fakes`` (and nothing else besides the real distributions) look installed."""
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [*REAL_DISTRIBUTIONS(), *fakes])


def error_of(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``sandbox ARGS`` prints on stderr, which must exit with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, lines
    assert len(lines) == 1, lines
    return lines[0]


def test_a_run_records_the_built_in_origin_of_every_component_it_uses(trained_tiny_run: Path) -> None:
    components = json.loads((trained_tiny_run / PROVENANCE_FILE).read_text())["components"]
    assert set(components) == {"dataset", "model", "backbone", "density", "perturbation",
                               "consistency.strong", "consistency.perturbed"}
    assert components["perturbation"] == {"kind": "perturbation", "name": "ddfp", "source": "built-in",
                                          "package": "sandbox-ssl", "version": __version__, "entry_point": "perturbations"}
    assert components["model"]["kind"] == "network"
    assert {entry["source"] for entry in components.values()} == {"built-in"}


def test_a_gone_plugin_of_a_run_is_named_with_its_package_or_path(
    tmp_path: Path, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = tmp_path / "site"
    modules.mkdir()
    (modules / "shake_provenance.py").write_text(SHAKE.format(name="shake"))
    (modules / "shake_provenance_two.py").write_text(SHAKE.format(name="shake2"))
    squared = tmp_path / "squared_loss.py"
    squared.write_text(SQUARED)
    monkeypatch.syspath_prepend(str(modules))
    for name in ("shake_provenance", "shake_provenance_two", "squared_loss"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # put back as it was afterwards
    install(monkeypatch, FakeDistribution("shake_provenance"))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--set", "perturbation.name=shake", "--set", "consistency.perturbed.name=squared",
              "--plugin", str(squared), *SHORT_RUN])
    assert exit_info.value.code == 0
    run_dir = tmp_path / "runs" / "tiny" / "seed3"
    recorded = json.loads((run_dir / PROVENANCE_FILE).read_text())["components"]
    assert recorded["perturbation"] == {"kind": "perturbation", "name": "shake", "source": "entry point",
                                        "package": "shake-plugin", "version": "1.2.3", "entry_point": "shake"}
    assert recorded["consistency.perturbed"] == {"kind": "consistency", "name": "squared", "source": "plugin",
                                                 "plugin": str(squared.resolve())}
    assert recorded["consistency.strong"]["source"] == "built-in"
    assert "density" not in recorded  # the run's recipe.toml leaves the unused table out too

    recipe = str(run_dir / "recipe.toml")
    Image.new("RGB", (40, 40)).save(tmp_path / "image.png")
    loads = {
        "eval": ["eval", recipe, "--checkpoint", str(run_dir / "best.pt")],
        "run --resume": ["run", recipe, "--resume"],
        "probe": ["probe", str(run_dir)],
        "predict": ["predict", recipe, str(tmp_path / "image.png"), "--checkpoint", str(run_dir / "best.pt"),
                    "--out", str(tmp_path / "predicted")],
    }
    install(monkeypatch)  # the package is uninstalled
    for command, args in loads.items():
        assert error_of(args, capsys) == (
            f"error: run {run_dir} used perturbation 'shake' from package shake-plugin 1.2.3 (entry point shake), "
            "which is not installed here; pip install shake-plugin==1.2.3"
        ), command
    install(monkeypatch, FakeDistribution("shake_provenance_two", version="2.0.0"))  # a version without it
    assert error_of(loads["eval"], capsys).endswith(
        "(entry point shake), but shake-plugin 2.0.0 installed here registers no perturbation 'shake'; "
        "pip install shake-plugin==1.2.3"
    )
    install(monkeypatch, FakeDistribution("shake_provenance"))
    squared.rename(tmp_path / "moved.py")  # the --plugin file is gone
    assert error_of(loads["eval"], capsys) == (
        f"error: run {run_dir} used consistency 'squared' from --plugin {squared.resolve()}, which does not exist here"
    )

    (tmp_path / "moved.py").rename(squared)
    install(monkeypatch, FakeDistribution("shake_provenance", version="1.2.4"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the record is not part of the recipe: resuming is not refused
        main(loads["run --resume"])
    assert exit_info.value.code == 0
    assert ("note: perturbation 'shake' now comes from package shake-plugin 1.2.4 (entry point shake); the run "
            "started with package shake-plugin 1.2.3 (entry point shake)") in capsys.readouterr().err
    assert json.loads((run_dir / PROVENANCE_FILE).read_text())["components"] == recorded
