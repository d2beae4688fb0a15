"""Malformed inputs: each is one line on stderr naming the culprit, exit status 2, no traceback."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from fake_distribution import FakeDistribution
from sandbox.cli import main
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry
from sandbox.recipe import load_recipe, resolve_components
from sandbox.rundir.directory import RunDirectory

SHORT = ["--set", "train.iters=2", "--set", "train.warmup_iters=2"]


@dataclass
class Case:
    """A malformed input: ``make(tmp_path, tiny_recipe)`` writes files and returns the CLI arguments."""

    make: Callable[[Path, Path], list[str]]
    expected: str
    """Text the error line must hold (the file, key or plugin at fault)."""


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def show(*extra: str) -> Callable[[Path, Path], list[str]]:
    """``sandbox recipe show TINY --set ...``."""
    return lambda tmp, tiny: ["recipe", "show", str(tiny), *extra]


def recipe_text(text: str) -> Callable[[Path, Path], list[str]]:
    """``sandbox recipe show`` of a recipe file holding ``text``."""
    return lambda tmp, tiny: ["recipe", "show", write(tmp / "bad.toml", text)]


def with_plugin(source: str, *extra: str) -> Callable[[Path, Path], list[str]]:
    """``sandbox recipe show TINY --plugin FILE.py`` with a plugin file holding ``source``."""
    return lambda tmp, tiny: ["recipe", "show", str(tiny), "--plugin", write(tmp / "bad_plugin.py", source), *extra]


def run_with_plugin(source: str, *extra: str) -> Callable[[Path, Path], list[str]]:
    """``sandbox run TINY --plugin FILE.py ...`` with a plugin file holding ``source``."""
    return lambda tmp, tiny: ["run", str(tiny), "--plugin", write(tmp / "bad_plugin.py", source), *extra]


def folder_dataset(tmp: Path, images: list[str], masks: list[str]) -> Path:
    """A ``folder`` dataset root with the given image and mask stems."""
    root = tmp / "folder"
    for sub, stems in (("images", images), ("masks", masks)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            pixels = np.zeros((8, 8, 3) if sub == "images" else (8, 8), np.uint8)
            Image.fromarray(pixels).save(root / sub / f"{stem}.png")
    return root


def dataset_run(make_root: Callable[[Path], Path], *extra: str) -> Callable[[Path, Path], list[str]]:
    """``sandbox bench --data`` (builds the dataset, trains nothing) on a ``folder`` dataset."""

    def make(tmp: Path, tiny: Path) -> list[str]:
        root = make_root(tmp)
        return ["bench", str(tiny), "--data", "--set", "dataset.name=folder", "--set", f"dataset.root={root.as_posix()}",
                "--set", 'dataset.class_names=["a","b"]', *extra]

    return make


def tiny_weights(tmp: Path, tiny: Path, *overrides: str, num_classes: int = 5) -> Path:
    """A ``best.pt``-style weights file of the tiny recipe's model with ``overrides``."""
    from sandbox.train.builder import build_model

    recipe = resolve_components(load_recipe(tiny, list(overrides)), load_registry())
    model = build_model(recipe, load_registry(), num_classes)
    path = tmp / "other.pt"
    torch.save({"model": model.state_dict(), "step": 0}, path)
    return path


def eval_of(make_checkpoint: Callable[[Path, Path], Path]) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, tiny: ["eval", str(tiny), "--checkpoint", str(make_checkpoint(tmp, tiny)), *SHORT]


def prepared_run(tmp: Path, tiny: Path) -> None:
    """A run directory of the tiny recipe (resolved recipe written), as a started run leaves it."""
    recipe = resolve_components(load_recipe(tiny, SHORT[1::2]), load_registry())
    RunDirectory.for_recipe(recipe).prepare(recipe, resume=False, overwrite=False)


def resume_changed(tmp: Path, tiny: Path) -> list[str]:
    prepared_run(tmp, tiny)
    return ["run", str(tiny), *SHORT, "--set", "train.lr=0.5", "--resume"]


def binary(path: Path) -> str:
    """A file of bytes that are no text (a model's weights, say)."""
    path.write_bytes(bytes(range(256)) * 4)
    return str(path)


def finished_run(tmp: Path, tiny: Path) -> Path:
    """A run directory with its recipe and a metrics record (enough for ``sandbox plot`` curves)."""
    prepared_run(tmp, tiny)
    run_dir = tmp / "runs" / "tiny" / "seed3"
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return run_dir


def existing_run(tmp: Path, tiny: Path) -> list[str]:
    prepared_run(tmp, tiny)
    return ["run", str(tiny), *SHORT]


def base_cycle(tmp: Path, tiny: Path) -> list[str]:
    write(tmp / "b.toml", 'base = "a.toml"\n')
    return ["recipe", "show", write(tmp / "a.toml", 'base = "b.toml"\n[dataset]\nname = "shapes"\n')]


PERTURBATION = "from sandbox.api import Perturbation, hookimpl\n"
RAISING_PLUGIN = Path(__file__).with_name("raising_perturbation.py")
WRONG_OUTPUT = PERTURBATION + '''
class Wrong(Perturbation):
    """Returns a malformed result of the ``kind`` asked for."""

    def __init__(self, kind: str = "channels") -> None:
        super().__init__()
        self.kind = kind

    def forward(self, features, context):
        return {"channels": features[:, :3], "float64": features.double(), "int64": features.long(),
                "list": [features], "size": features[..., :2, :2]}[self.kind]


@hookimpl
def sandbox_register_perturbations(register):
    register("wrong", Wrong)
'''
NONDETERMINISTIC = PERTURBATION + '''
from torch._prims_common import alert_not_deterministic


class Nondeterministic(Perturbation):
    """Calls torch's own refusal, as an operation without a deterministic kernel on the device does."""

    def forward(self, features, context):
        alert_not_deterministic("index_add_cuda_")
        return features * 1.0


@hookimpl
def sandbox_register_perturbations(register):
    register("nondeterministic", Nondeterministic)
'''
PER_PIXEL_LOSS = PERTURBATION + '''
from sandbox.api import ConsistencyLoss


class PerPixel(ConsistencyLoss):
    """Forgets to reduce: returns a map."""

    def forward(self, logits, target_probs, valid):
        return valid.float()


@hookimpl
def sandbox_register_consistency_losses(register):
    register("map", PerPixel)
'''

CASES: dict[str, Case] = {
    # -- recipes ---------------------------------------------------------------------------------
    "bad TOML": Case(recipe_text("[train\niters = 3\n"), "bad.toml: invalid TOML"),
    "unknown top-level key": Case(recipe_text('colour = "red"\n[dataset]\nname = "shapes"\n'), "unknown key 'colour'"),
    "unknown [train] key": Case(show("--set", "train.iterz=3"), "unknown key 'train.iterz'"),
    "wrong type": Case(show("--set", "train.iters=many"), "train.iters = 'many'"),
    "value out of range": Case(show("--set", "train.threshold=1.5"), "train.threshold = 1.5"),
    "not a choice": Case(show("--set", "train.mixed_precision=fp8"), "train.mixed_precision = 'fp8'"),
    "keys that contradict each other": Case(
        show("--set", "train.teacher_mode=eval"), "train.teacher_statistics = 'own' needs train.teacher_mode = 'train'"
    ),
    "missing dataset table": Case(recipe_text("seed = 1\n"), "missing key 'dataset'"),
    "unknown plugin name": Case(show("--set", "perturbation.name=shaky"), "[perturbation] name = 'shaky': unknown perturbation"),
    "unknown plugin option": Case(show("--set", "perturbation.epsilon=2"), "unknown option 'epsilon' for perturbation 'ddfp'"),
    "wrong plugin option type": Case(show("--set", "perturbation.eps=big"), "[perturbation]: eps = 'big'"),
    "--set without =": Case(show("--set", "train.iters"), "--set 'train.iters': expected KEY=VALUE"),
    "--set into a value": Case(show("--set", "seed.x=1"), "'seed' is a value, not a table"),
    "missing recipe": Case(lambda tmp, tiny: ["recipe", "show", str(tmp / "nowhere.toml")], "nowhere.toml does not exist"),
    "missing base": Case(recipe_text('base = "parent.toml"\n'), "parent.toml (base of"),
    "base not a path": Case(recipe_text("base = 3\n"), "bad.toml: base = 3"),
    "base cycle": Case(base_cycle, "base recipes form a cycle"),
    "base is itself": Case(recipe_text('base = "bad.toml"\n'), "base recipes form a cycle"),
    # -- datasets --------------------------------------------------------------------------------
    "missing dataset folder": Case(dataset_run(lambda tmp: tmp / "absent"), "absent"),
    "image without mask": Case(dataset_run(lambda tmp: folder_dataset(tmp, ["a", "b", "c"], ["a", "c"])), "b.png has no mask"),
    "empty class_names": Case(dataset_run(lambda tmp: folder_dataset(tmp, ["a"], ["a"]), "--set", "dataset.class_names=[]"),
                              "class_names is empty"),
    "dataset option missing": Case(show("--set", "dataset.name=folder"), "dataset 'folder' needs option 'root'"),
    # -- plugins ---------------------------------------------------------------------------------
    "plugin file missing": Case(lambda tmp, tiny: ["plugins", "--plugin", str(tmp / "gone.py")], "gone.py does not exist"),
    "plugin module missing": Case(lambda tmp, tiny: ["plugins", "--plugin", "no_such_plugin_xyz"], "'no_such_plugin_xyz' failed to import"),
    "plugin fails to import": Case(with_plugin("import not_installed_dependency\n"), "bad_plugin.py failed to import: ModuleNotFoundError"),
    "plugin syntax error": Case(with_plugin("def broken(:\n"), "bad_plugin.py failed to import: SyntaxError"),
    "hook raises": Case(with_plugin(PERTURBATION + "@hookimpl\ndef sandbox_register_perturbations(register):\n    raise RuntimeError('boom')\n"),
                        "plugin bad_plugin: sandbox_register_perturbations failed: RuntimeError: boom"),
    "duplicate name": Case(with_plugin(PERTURBATION + "@hookimpl\ndef sandbox_register_perturbations(register):\n"
                                       "    register('ddfp', lambda: None)\n"), "perturbation name 'ddfp' is registered twice"),
    "factory not callable": Case(with_plugin(PERTURBATION + "@hookimpl\ndef sandbox_register_perturbations(register):\n"
                                             "    register('odd', 42)\n"), "perturbation 'odd' factory is not callable"),
    "factory returns wrong type": Case(
        lambda tmp, tiny: ["bench", str(tiny), "--plugin", write(tmp / "bad_plugin.py", PERTURBATION +
                           "def make() -> str:\n    '''Not a perturbation.'''\n    return 'oops'\n"
                           "@hookimpl\ndef sandbox_register_perturbations(register):\n    register('wrong', make)\n"),
                           "--set", "perturbation.name=wrong", "--steps", "1", "--warmup", "0", "--num-classes", "2"],
        "perturbation 'wrong' (from bad_plugin) returned str, expected a Perturbation"),
    "factory TypeError for an option combination": Case(
        lambda tmp, tiny: ["bench", str(tiny), "--plugin", write(tmp / "bad_plugin.py", PERTURBATION +
                           "def make(a: int = 0, b: int = 0):\n    '''Needs a or b.'''\n"
                           "    if a and b:\n        raise TypeError('give a or b, not both')\n"
                           "@hookimpl\ndef sandbox_register_perturbations(register):\n    register('picky', make)\n"),
                           "--set", "perturbation.name=picky", "--set", "perturbation.a=1", "--set", "perturbation.b=1",
                           "--steps", "1", "--warmup", "0", "--num-classes", "2"],
        "perturbation 'picky' (bad_plugin): TypeError: give a or b, not both"),
    # -- checkpoints -----------------------------------------------------------------------------
    "eval of a corrupt best.pt": Case(eval_of(lambda tmp, tiny: Path(write(tmp / "best.pt", "garbage"))), "best.pt could not be read"),
    "eval of a missing checkpoint": Case(eval_of(lambda tmp, tiny: tmp / "absent.pt"), "absent.pt does not exist"),
    "eval of a file without a state dict": Case(
        eval_of(lambda tmp, tiny: (torch.save([1, 2], tmp / "list.pt"), tmp / "list.pt")[1]), "list.pt holds no state dict"),
    "eval of weights with another number of classes": Case(
        eval_of(lambda tmp, tiny: tiny_weights(tmp, tiny, num_classes=3)),
        "other.pt does not fit recipe 'tiny' (mismatched parts: final): shape of final.weight"),
    "eval of weights with other decoder channels": Case(
        eval_of(lambda tmp, tiny: tiny_weights(tmp, tiny, "model.channels=16")), "(mismatched parts: aspp, "),
    "eval of another backbone's weights": Case(
        eval_of(lambda tmp, tiny: tiny_weights(tmp, tiny, "backbone.model=resnet10t")), "(mismatched parts: backbone)"),
    "--resume of a missing run": Case(lambda tmp, tiny: ["run", str(tiny), *SHORT, "--resume"], "holds no run to resume"),
    "--resume with a changed recipe": Case(resume_changed, "the recipe differs from"),
    "existing run directory": Case(existing_run, "already exists; use --resume"),
    "a plugin raising during training": Case(
        lambda tmp, tiny: ["run", str(tiny), "--plugin", str(RAISING_PLUGIN), "--set", "perturbation.name=raise_on_call"],
        "training failed after 3 of 6 steps: perturbation 'raise_on_call' (from raising_perturbation) raised in forward: "
        "RuntimeError: planted failure on process 0"),
    **{f"a perturbation returning {what}": Case(
        run_with_plugin(WRONG_OUTPUT, "--set", "perturbation.name=wrong", "--set", f"perturbation.kind={kind}"), expected)
       for what, kind, expected in [
           ("too few channels", "channels", "returned a tensor (2, 3, 8, 8) float32 on cpu, expected a tensor (2, 40, 8, 8) float32"),
           ("another spatial size", "size", "returned a tensor (2, 40, 2, 2) float32 on cpu, expected a tensor (2, 40, 8, 8)"),
           ("float64", "float64", "returned a tensor (2, 40, 8, 8) float64 on cpu, expected"),
           ("int64", "int64", "returned a tensor (2, 40, 8, 8) int64 on cpu, expected"),
           ("a list", "list", "perturbation 'wrong' (from bad_plugin) returned list, expected a tensor (2, 40, 8, 8)"),
       ]},
    "an operation without a deterministic implementation": Case(
        run_with_plugin(NONDETERMINISTIC, "--set", "perturbation.name=nondeterministic", "--set", "train.deterministic=true"),
        "train.deterministic = true: index_add_cuda_ (in perturbation 'nondeterministic' (from bad_plugin)'s forward) has "
        "no deterministic implementation on this device"),
    "a consistency loss returning a map": Case(
        run_with_plugin(PER_PIXEL_LOSS, "--set", "consistency.strong.name=map"),
        "training failed after 2 of 6 steps: consistency 'map' (from bad_plugin) returned (2, 32, 32) float32 on cpu, "
        "expected a floating-point scalar tensor"),
    # (a --plugin with hooks loaded beside: a module registering nothing is an error of its own)
    "a negative perturbation size": Case(run_with_plugin(WRONG_OUTPUT, "--set", "perturbation.eps=-1"),
                                         "perturbation 'ddfp' (sandbox-ssl 0.1.0): eps must be >= 0"),
    "a negative noise scale": Case(run_with_plugin(WRONG_OUTPUT, "--set", "perturbation.name=noise", "--set",
                                                   "perturbation.scale=-0.5"), "scale must be >= 0"),
    "warm-up longer than the run": Case(show("--set", "train.warmup_iters=7"),
                                        "train.warmup_iters (7) > train.iters (6): the run would end inside its warm-up"),
    "centre-crop evaluation without a size": Case(show("--set", "eval.mode=center_crop"),
                                                  "eval.mode = 'center_crop' needs eval.crop_size"),
    "a binary file as recipe": Case(lambda tmp, tiny: ["run", binary(tmp / "model.toml")],
                                    "model.toml is not UTF-8 text (byte 128); expected a TOML file"),
    "a directory as recipe": Case(lambda tmp, tiny: ["run", str(tmp)], f"is a directory; expected a TOML file"),
    "a directory as checkpoint": Case(eval_of(lambda tmp, tiny: tmp), "is a directory (expected a run's best.pt or last.pt)"),
    "a text file as checkpoint": Case(eval_of(lambda tmp, tiny: Path(write(tmp / "notes.pt", "trained on Monday\n"))),
                                      "notes.pt could not be read: not a PyTorch file"),
    "no labeled images": Case(lambda tmp, tiny: ["run", str(tiny), "--set", "dataset.num_labeled=0"],
                              "[dataset] 'shapes' has no labeled images"),
    "--resume with --overwrite": Case(lambda tmp, tiny: ["run", str(tiny), "--resume", "--overwrite"],
                                      "--resume and --overwrite contradict each other"),
    "output_dir is a file": Case(lambda tmp, tiny: ["run", str(tiny), "--set", f"output_dir={write(tmp / 'out', 'x')}"],
                                 "cannot be written: Not a directory"),
    "predict --out under a file": Case(
        lambda tmp, tiny: ["predict", str(tiny), write(tmp / "image.png", ""), "--checkpoint",
                           str(tiny_weights(tmp, tiny)), "--out", str(Path(write(tmp / "taken", "x")) / "preds")],
        "--out {tmp}/taken/preds: cannot write"),
    "plot --out under a file": Case(
        lambda tmp, tiny: ["plot", str(finished_run(tmp, tiny)), "--images", "0", "--out",
                           str(Path(write(tmp / "taken", "x")) / "plots")], "--out {tmp}/taken/plots: cannot write"),
    "a recipe's plugin file missing": Case(
        lambda tmp, tiny: ["recipe", "show", write(tmp / "recipes" / "r.toml", 'plugins = ["mine.py"]\n[dataset]\nname = "shapes"\n')],
        "plugin file {tmp}/recipes/mine.py does not exist"),
    "a --plugin file missing, relative": Case(lambda tmp, tiny: ["plugins", "--plugin", "gone_relative.py"],
                                              "plugin file gone_relative.py does not exist (looked in "),
    "a factory raising RuntimeError": Case(
        run_with_plugin(PERTURBATION + "def make():\n    '''Fails.'''\n    raise RuntimeError('no GPU kernel')\n"
                        "@hookimpl\ndef sandbox_register_perturbations(register):\n    register('fragile', make)\n",
                        "--set", "perturbation.name=fragile"),
        "perturbation 'fragile' (bad_plugin): RuntimeError: no GPU kernel"),
    # -- issue 36: tracebacks (exit 1) before, and inputs that changed what runs without a word ----
    **{f"bench --workers {workers}": Case(
        lambda tmp, tiny, workers=workers: ["bench", str(tiny), "--data", "--workers", workers],
        f"--workers {workers!r}: expected comma-separated numbers of DataLoader workers, integers >= 0")
       for workers in ["-1", "0,abc", ""]},
    "a run name longer than a folder name may be": Case(
        show("--set", "name=" + "a" * 300),
        "name = 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...': 300 bytes, more than the 255 a folder name may have on "
        "the file system of output_dir ({tmp}/runs); expected a shorter run name"),
    "a run name with a folder longer than a folder name may be": Case(
        lambda tmp, tiny: ["ablate", str(tiny), "--set", "name=sweeps/" + "é" * 200, "--list"],
        "its folder 'éééééééééééééééééééééééééééééééééééééééé...' is 400 bytes, more than the 255"),
    "a run name with a NUL character": Case(show("--set", 'name="a\\u0000b"'), "name = 'a\\x00b': expected a run name without NUL"),
    "a sweep's run folder name longer than a folder name may be": Case(
        lambda tmp, tiny: ["ablate", str(tiny), "--grid", f"train.lr=0.{'0' * 300}1", "--list"],
        "--grid: the run folder name 'train.lr=0.00000000000000000000000000000...' is 312 bytes, more than the 255"),
    "an output stride timm cannot give": Case(
        lambda tmp, tiny: ["bench", str(tiny), "--set", "backbone.output_stride=7", "--num-classes", "2"],
        "backbone 'timm' (sandbox-ssl 0.1.0): output_stride = 7: expected one of 8, 16, 32"),
    **{f"--set {setting} with --grid {axis}": Case(
        lambda tmp, tiny, setting=setting, axis=axis: ["ablate", str(tiny), "--grid", axis, "--set", setting, "--list"],
        f"--set {setting!r} and --grid {axis} both set train.lr: the grid's values would replace the --set one")
       for setting, axis in [("train.lr=0.3", "train.lr=0.1,0.2"), ("train={lr=0.3}", "train.lr=0.1,0.2"),
                             ("train.lr=0.3", "train={lr=0.1},{lr=0.2}")]},
    "--grid name": Case(lambda tmp, tiny: ["ablate", str(tiny), "--grid", "name=a,b", "--list"],
                        "the sweep sets 'name' itself (each run is named by its combination, <--output>/<recipe name>/"
                        "<key=value,...>/seed<k>; use --set name=... to name the sweep's folder)"),
    "--grid output_dir": Case(lambda tmp, tiny: ["ablate", str(tiny), "--grid", "output_dir=a,b", "--list"],
                              "the sweep sets 'output_dir' itself (use --output DIR for the sweep's folder)"),
    "--plugin of a folder": Case(
        lambda tmp, tiny: ["run", str(tiny), "--plugin", str(Path(write(tmp / "mine" / "shake.py", "x = 1\n")).parent)],
        "plugin {tmp}/mine is a folder; expected a module or .py file defining at least one sandbox hook "
        "(@hookimpl from sandbox.api), e.g. {tmp}/mine/shake.py"),
    "--plugin of a file without hooks": Case(
        run_with_plugin("from sandbox.api import hookimpl\n\ndef helper():\n    pass\n"),
        "plugin {tmp}/bad_plugin.py defines no sandbox hook; expected a module or .py file defining at least one"),
    "--plugin of a module without hooks": Case(lambda tmp, tiny: ["plugins", "--plugin", "json"],
                                               "plugin json defines no sandbox hook; expected a module or .py file"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_is_one_line(name: str, tmp_path: Path, tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    case = CASES[name]
    args = case.make(tmp_path, tiny_recipe)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    finally:
        sys.modules.pop("bad_plugin", None)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    assert case.expected.replace("{tmp}", tmp_path.as_posix()) in errors[0], errors[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run"], "Missing argument 'recipe'"),
        (["run", "r.toml", "--frobnicate"], "No such option: --frobnicate"),
        (["eval", "r.toml"], "Missing option '--checkpoint'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["bench", "r.toml", "--steps", "many"], "Invalid value for '--steps'"),
    ],
)
def test_a_command_line_mistake_is_one_usage_error(args: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected.lower() in err.lower()


def test_a_broken_installed_plugin_never_breaks_the_others(
    tmp_path: Path, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "broken_plugin_xyz.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [*real(), FakeDistribution("broken_plugin_xyz", name="broken-plugin", version="0.1")])

    with pytest.raises(SystemExit) as exit_info:
        main(["plugins"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert " ddfp " in out and " glow " in out, "the other plugins are listed"
    assert "broken-plugin 0.1" in out and "failed to import: ImportError: needs" in out

    with pytest.raises(SystemExit) as exit_info:
        main(["recipe", "show", str(tiny_recipe)])
    assert exit_info.value.code == 0, "a recipe naming working plugins is unaffected"

    with pytest.raises(SystemExit) as exit_info:
        main(["recipe", "show", str(tiny_recipe), "--set", "perturbation.name=shake"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "unknown perturbation" in err and "failed to import" in err and "needs libfoo" in err


INSTALLED_PLUGIN_WITH_A_MISSPELLED_HOOK = """
from sandbox.api import hookimpl

@hookimpl
def sandbox_register_perturbations(register):
    register("shake_ok", lambda **options: None, "works")

@hookimpl
def sandbox_register_perturbatons(register):
    register("shake", lambda **options: None, "never registered: the hook name is misspelled")

def sandbox_register_consistency_losses(register):
    register("shaky", lambda **options: None, "never registered: no @hookimpl")
"""


def test_an_installed_plugin_with_hooks_never_called_is_reported_and_the_rest_still_works(
    tmp_path: Path, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "misspelled_plugin_xyz.py").write_text(INSTALLED_PLUGIN_WITH_A_MISSPELLED_HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.distributions
    fake = FakeDistribution("misspelled_plugin_xyz", name="misspelled-plugin", version="0.2")
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [*real(), fake])
    monkeypatch.setenv("COLUMNS", "1000")  # the problems in one table line each

    with pytest.raises(SystemExit) as exit_info:
        main(["plugins"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and " shake_ok " in out, "the package's valid hook still registers"
    assert " ddfp " in out and "broken" in out, "the other plugins still work; the package is listed as broken"
    assert "misspelled-plugin 0.2" in out and "sandbox_register_perturbatons is no sandbox hook" in out
    assert "sandbox_register_consistency_losses is not marked @hookimpl" in out

    with pytest.raises(SystemExit) as exit_info:
        main(["recipe", "show", str(tiny_recipe), "--set", "perturbation.name=shake"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "name = 'shake': unknown perturbation" in err and "broken plugins: misspelled-plugin 0.2" in err
    assert "sandbox_register_perturbatons is no sandbox hook" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 applies on a GPU")
def test_fp16_on_a_cpu_is_a_warning_and_the_summary_says_float32(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # earlier tests of this process set up Accelerate without mixed precision
    try:
        main_ok(["run", str(tiny_recipe), *SHORT, "--set", "train.mixed_precision=fp16"])
    finally:
        AcceleratorState._reset_state()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "train.mixed_precision = 'fp16' needs a GPU" in warnings[0], warnings
    summary = json.loads((tmp_path / "runs" / "tiny" / "seed3" / "summary.json").read_text())
    assert summary["mixed_precision"] == "no"


def test_a_crop_larger_than_the_images_at_every_scale_is_a_warning(
    tiny_recipe: Path, capsys: pytest.CaptureFixture
) -> None:
    main_ok(["run", str(tiny_recipe), *SHORT, "--set", "train.crop_size=100"])  # 48-pixel images, scale <= 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the first labeled image is 48x48, smaller than train.crop_size = 100 even at the "
                        "largest scale (2, train.scale_range): crops are padded with ignored pixels"]


def test_a_crop_the_images_fill_gives_no_warning(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    main_ok(["run", str(tiny_recipe), *SHORT, "--set", "train.crop_size=96"])  # 48 x 2 fills it
    assert "warning:" not in capsys.readouterr().err


def main_ok(args: list[str]) -> None:
    """Run the CLI; it must succeed."""
    try:
        main(args)
    except SystemExit as exit_info:
        assert not exit_info.code, exit_info.code


# -- issue 36: what a user expects of repeated plugins, inline tables and keys set twice -------------

TWICE_PLUGIN = """
from sandbox.api import hookimpl

@hookimpl
def sandbox_register_perturbations(register):
    register("twice", lambda **options: None, "registered once however often it is named")
"""


def test_the_same_plugin_given_twice_is_loaded_and_recorded_once(
    tmp_path: Path, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """It was pluggy's "Plugin name already registered" with a dump of every module (exit 1)."""
    import sandbox_builtins.backbones

    plugin = Path(write(tmp_path / "twice_plugin.py", TWICE_PLUGIN)).resolve()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    try:
        capsys.readouterr()
        main_ok(["recipe", "show", str(tiny_recipe), "--plugin", str(plugin), "--plugin", plugin.name])
        assert tomllib.loads(capsys.readouterr().out)["plugins"] == [str(plugin)]
        for plugins in ([str(plugin), plugin.name], ["twice_plugin", str(plugin)], [str(plugin), "twice_plugin"]):
            sys.modules.pop("twice_plugin", None)
            registry = load_registry(plugins)  # a recipe's list, or --plugin by path and by name
            assert registry.names("perturbation").count("twice") == 1, plugins
            factory = registry.get("perturbation", "twice").factory
            assert factory.__globals__ is vars(sys.modules["twice_plugin"]), "the module ran once: one of each class"
        assert load_registry([sandbox_builtins.backbones.__file__]).names("backbone").count("timm") == 1
    finally:
        for name in ("twice_plugin", "backbones"):
            sys.modules.pop(name, None)


def test_a_folder_named_as_a_module_is_no_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder without ``__init__.py`` on the path imports as an empty namespace: it registered nothing, silently."""
    write(tmp_path / "folder_of_plugins_xyz" / "shake.py", TWICE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(SandboxError, match=r"plugin folder_of_plugins_xyz is a folder; expected a module or \.py file "
                                               r"defining at least one sandbox hook \(@hookimpl from sandbox\.api\), e\.g\. "
                                               r"folder_of_plugins_xyz/shake\.py$"):
            load_registry(["folder_of_plugins_xyz"])
    finally:
        sys.modules.pop("folder_of_plugins_xyz", None)


def test_an_inline_table_in_set_merges_into_its_table(tiny_recipe: Path) -> None:
    """``--set 'train={iters=5}'`` replaced the whole [train] table: crop, lr and warm-up went back to their defaults."""
    merged = load_recipe(tiny_recipe, ["train={iters=5, lr=0.02}"])
    assert merged == load_recipe(tiny_recipe, ["train.iters=5", "train.lr=0.02"])
    assert (merged.train.crop_size, merged.train.warmup_iters) == (32, 2)
    assert load_recipe(tiny_recipe, ["perturbation={eps=3.0}"]).perturbation.options() == {"eps": 3.0}
    assert load_recipe(tiny_recipe, ['perturbation={name="noise"}']) == load_recipe(tiny_recipe, ["perturbation.name=noise"])


def test_set_and_grid_of_different_keys_still_sweep(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    """An inline table that does not hold the grid's key is no clash."""
    main_ok(["ablate", str(tiny_recipe), "--grid", "train.lr=0.1,0.2", "--set", "train={iters=7}", "--list"])
    assert "2 runs" in capsys.readouterr().out


def test_a_timm_model_that_cannot_dilate_names_its_output_stride() -> None:
    """timm refuses with an assertion of its own; the message keeps its reason."""
    from sandbox_builtins.backbones import TimmBackbone

    with pytest.raises(ValueError, match=r"^output_stride = 8: timm model 'ghostnet_050' does not support it \(only "):
        TimmBackbone(model="ghostnet_050", output_stride=8)
