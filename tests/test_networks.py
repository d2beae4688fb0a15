"""Segmentation networks as plugins: every smp architecture trains DDFP steps, DPT on a patch-14 ViT."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from sandbox.api import DualBatchNorm2d, SegmentationNetwork
from sandbox.bench.steps import synthetic_training
from sandbox.cli import main
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry
from sandbox.recipe import load_recipe, resolve_components
from sandbox.train.builder import build_model
from sandbox_builtins.smp_networks import ARCHITECTURES

SMALL_ENCODER = {"DPT": "tu-vit_tiny_patch16_224"}
"""A small encoder per architecture (resnet18 unless named here; DPT needs a timm ViT)."""
CROP = {"PAN": 128}
"""The smallest crop each architecture runs at with its encoder (default 64)."""


def smp_recipe(tiny_recipe: Path, architecture: str, *extra: str):
    """The tiny recipe with ``[model] name = "smp"`` and a small encoder for ``architecture``."""
    overrides = ["model.name=smp", f"model.architecture={architecture}",
                 f"model.encoder={SMALL_ENCODER.get(architecture, 'resnet18')}",
                 f"train.crop_size={CROP.get(architecture, 64)}", *extra]
    return resolve_components(load_recipe(tiny_recipe, overrides), load_registry())


def smp_reference(architecture: str, num_classes: int) -> torch.nn.Module:
    """smp's own model with the same encoder (what the network must equal apart from its head)."""
    options = {"dynamic_img_size": True} if architecture == "DPT" else {}
    encoder = SMALL_ENCODER.get(architecture, "resnet18")
    return getattr(smp, architecture)(encoder_name=encoder, encoder_weights=None, classes=num_classes, **options)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_smp_architecture_trains_two_ddfp_steps(architecture: str, tiny_recipe: Path) -> None:
    recipe = smp_recipe(tiny_recipe, architecture)
    training = synthetic_training(recipe, load_registry(), 3, recipe.perturbation)
    network = training.accelerator.unwrap_model(training.model)
    assert isinstance(network, SegmentationNetwork)
    encoder_before = [p.detach().clone() for p in network.encoder_parameters()]
    for step in range(2):
        outcome = training.iteration(step, training.labeled, training.unlabeled)
        assert outcome.finite and outcome.stepped, architecture
        assert "loss_perturbed" in outcome.logs and "density_nll" in outcome.logs, "a DDFP step with its perturbed view"
    changed = sum(not torch.equal(before, p) for before, p in zip(encoder_before, network.encoder_parameters()))
    assert changed > 0, "the encoder trains"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_network_is_smps_model_apart_from_the_head(architecture: str, tiny_recipe: Path) -> None:
    network = build_model(smp_recipe(tiny_recipe, architecture), load_registry(), 5)
    reference = smp_reference(architecture, 5)
    ours = count(network) - count(network.classifier) - count(network.final)
    assert ours == count(reference) - count(reference.segmentation_head)
    assert network.feature_channels == next(m for m in reference.segmentation_head.modules()
                                            if isinstance(m, torch.nn.Conv2d)).in_channels
    norms = [m for m in network.classifier.modules() if isinstance(m, DualBatchNorm2d)]
    assert len(norms) == 1, "one Mix-BN conv layer by default"
    crop = CROP.get(architecture, 64)
    assert network.eval()(torch.randn(2, 3, crop, crop)).logits.shape == (2, 5, crop, crop)


def test_the_perturbations_gradient_reaches_the_encoder_through_the_clean_features(tiny_recipe: Path) -> None:
    network = build_model(smp_recipe(tiny_recipe, "FPN"), load_registry(), 3).train()
    out = network(torch.randn(4, 3, 64, 64), perturb=lambda features, classify, clean: features + 0.5, num_perturbed=2)
    out.perturbed_logits.sum().backward()
    encoder_grads = [p.grad for p in network.encoder_parameters() if p.grad is not None]
    assert encoder_grads and any(g.abs().sum() > 0 for g in encoder_grads)


def test_a_checkpoint_round_trip_gives_the_same_predictions(tiny_recipe: Path) -> None:
    recipe = smp_recipe(tiny_recipe, "Unet")
    first = build_model(recipe, load_registry(), 3).eval()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    torch.manual_seed(123)  # a differently initialised copy
    second = build_model(recipe, load_registry(), 3).eval()
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(first(images).logits, second(images).logits)


def test_inputs_that_are_not_multiples_are_padded_for_prediction_and_refused_for_training(tiny_recipe: Path) -> None:
    network = build_model(smp_recipe(tiny_recipe, "FPN"), load_registry(), 3)
    assert network.size_divisor == 32
    assert network.eval()(torch.randn(1, 3, 50, 70)).logits.shape == (1, 3, 50, 70)
    with pytest.raises(ValueError, match="multiples of 32"):
        network.train()(torch.randn(2, 3, 50, 50), perturb=lambda f, c, clean: f, num_perturbed=1)


def test_encoder_weights_come_from_a_local_file(tiny_recipe: Path, tmp_path: Path) -> None:
    source = smp_reference("Unet", 3)
    torch.save(source.encoder.state_dict(), tmp_path / "resnet18.pth")
    network = build_model(smp_recipe(tiny_recipe, "Unet", f"model.weights={tmp_path / 'resnet18.pth'}"), load_registry(), 3)
    assert all(torch.equal(a, b) for a, b in zip(source.encoder.state_dict().values(), network.encoder.state_dict().values()))


def test_dpt_on_a_patch14_dinov2_vit_trains_and_evaluates(tiny_recipe: Path, tmp_path: Path) -> None:
    """DINOv2 ViT-S/14 with DPT: a 56-pixel crop (a multiple of 28) trains; 48-pixel val images are padded."""
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--set", "model.name=smp", "--set", "model.architecture=DPT",
              "--set", "model.encoder=tu-vit_small_patch14_dinov2", "--set", "train.crop_size=56",
              "--set", "train.iters=4"])
    assert not exit_info.value.code
    summary = json.loads((tmp_path / "runs" / "tiny" / "seed3" / "summary.json").read_text())
    assert summary["iters"] == 4 and 0 <= summary["final_miou"] <= 1
    network = build_model(resolve_components(load_recipe(tmp_path / "runs" / "tiny" / "seed3" / "recipe.toml"),
                                             load_registry()), load_registry(), 5)
    assert network.size_divisor == 28 and network.feature_channels == 256


def test_a_crop_that_does_not_fit_the_network_is_one_line(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--set", "model.name=smp", "--set", "model.architecture=FPN",
              "--set", "model.encoder=resnet18", "--set", "train.crop_size=50"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: train.crop_size = 50 does not fit [model] 'smp': its input sides must be multiples of 32, e.g. 32 or 64"
    )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bench_times_every_smp_architecture(architecture: str, tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    encoder = SMALL_ENCODER.get(architecture, "resnet18")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(tiny_recipe), "--steps", "1", "--warmup", "0", "--num-classes", "3", "--set", "model.name=smp",
              "--set", f"model.architecture={architecture}", "--set", f"model.encoder={encoder}",
              "--set", f"train.crop_size={CROP.get(architecture, 64)}"])
    assert not exit_info.value.code
    out = capsys.readouterr().out
    assert "ddfp" in out and "none" in out


def test_the_default_network_is_ddfps_deeplabv3plus(tiny_recipe: Path) -> None:
    recipe = resolve_components(load_recipe(tiny_recipe), load_registry())
    assert recipe.model.name == "deeplabv3plus" and recipe.model.options()["aspp_dilations"] == [1, 2, 3]


def test_an_official_dinov2_file_loads_through_timms_conversion(tmp_path: Path) -> None:
    """The DINOv2 release's keys (with ``mask_token``, 518-pixel position embeddings) load into the encoder."""
    import timm

    official = timm.create_model("vit_small_patch14_dinov2", pretrained=False).state_dict()
    official["mask_token"] = torch.zeros(1, 384)
    official = {key: value + 0.25 if key.endswith("norm.weight") else value for key, value in official.items()}
    torch.save(official, tmp_path / "dinov2_vits14_pretrain.pth")
    network = load_registry().get("network", "smp").build(
        {"architecture": "DPT", "encoder": "tu-vit_small_patch14_dinov2", "weights": str(tmp_path / "dinov2_vits14_pretrain.pth")},
        num_classes=3,
    )
    loaded = network.encoder.model.state_dict()
    assert torch.equal(loaded["norm.weight"], official["norm.weight"]) and "mask_token" not in loaded


def test_the_dinov2_recipe_builds_unimatch_v2s_small_dpt() -> None:
    recipe_path = Path(__file__).parent.parent / "recipes" / "ddfp_dinov2_pascal.toml"
    recipe = resolve_components(load_recipe(recipe_path, ["model.weights=none"]), load_registry())
    network = build_model(recipe, load_registry(), 21)
    assert network.size_divisor == 28 and recipe.train.crop_size % 28 == 0
    assert network.feature_channels == 64 and network.embedding_channels == 64
    # DINOv2 ViT-S/14 at its 518-pixel grid: 22.06 M (the release adds a 384-d mask_token, pretraining only)
    assert count(network.encoder) == 22_056_192


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0"])
def test_a_full_timm_checkpoint_loads_into_a_tu_feature_encoder(name: str, tmp_path: Path) -> None:
    """timm's feature wrapper renames modules (``stem.0`` -> ``stem_0``) and drops heads: the file is
    the whole timm model's state dict, as timm and most releases save it."""
    import timm

    full = {key: value + 0.5 if value.is_floating_point() else value
            for key, value in timm.create_model(name, pretrained=False).state_dict().items()}
    torch.save(full, tmp_path / f"{name}.pth")
    network = load_registry().get("network", "smp").build(
        {"architecture": "Unet", "encoder": f"tu-{name}", "weights": str(tmp_path / f"{name}.pth")}, num_classes=3)
    loaded = network.encoder.model.state_dict()

    def original(key: str) -> str:  # the wrapper flattens top-level containers: stages.0 -> stages_0
        top, _, rest = key.partition(".")
        return key if key in full else ".".join([top.replace("_", ".", 1), rest])

    keys = [key for key in loaded if not key.endswith("num_batches_tracked")]
    assert keys and all(original(key) in full for key in keys)
    assert all(torch.equal(loaded[key], full[original(key)]) for key in keys)


def test_a_checkpoint_of_another_encoder_is_one_line(tmp_path: Path) -> None:
    import timm

    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(SandboxError, match=r"encoder weights .*resnet18.pth do not (fit|match)"):
        load_registry().get("network", "smp").build(
            {"architecture": "Unet", "encoder": "tu-convnext_atto", "weights": str(tmp_path / "resnet18.pth")}, num_classes=3)


def test_encoder_perturbation_needs_encoder_maps(tiny_recipe: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_recipe), "--set", "model.name=smp", "--set", "model.architecture=DPT",
              "--set", "model.encoder=tu-vit_tiny_patch16_224", "--set", "train.crop_size=64",
              "--set", "train.perturb_at=encoder", "--set", "perturbation.name=dropout"])
    assert exit_info.value.code == 2
    assert "train.perturb_at = 'encoder': [model] 'smp' does not expose its encoder's maps" in capsys.readouterr().err
    assert build_model(smp_recipe(tiny_recipe, "FPN"), load_registry(), 3).has_encoder_maps()
