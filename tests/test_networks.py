"""Segmentation networks as plugins: every smp architecture trains DDFP steps, DPT on a patch-14 ViT."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any, NamedTuple

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
from sandbox_builtins.smp_networks import ARCHITECTURES, Removed, SmpNetwork, remove_unused_encoder_modules
from sandbox.train.student_pass import StudentPass, network_of
from gradient_checks import ATOL, RTOL, assert_same_gradients, reached

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


def count_used(model: torch.nn.Module, crop: int) -> int:
    """The parameters of ``model`` that its forward uses: those a backward from its output reaches."""
    model.train()(torch.randn(2, 3, crop, crop)).sum().backward()
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_smp_architecture_trains_two_ddfp_steps(architecture: str, tiny_recipe: Path) -> None:
    recipe = smp_recipe(tiny_recipe, architecture)
    training = synthetic_training(recipe, load_registry(), 3, recipe.perturbation)
    network = network_of(training.accelerator.unwrap_model(training.model))
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
    crop = CROP.get(architecture, 64)
    # smp's model minus its head and minus what its forward never uses, which the plugin removes:
    # PSPNet (encoder_depth 3) never runs resnet18's layer3 and layer4, DPT never reads the ViT's
    # final norm and classification head (count_used: the parameters its backward reaches)
    assert ours == count_used(reference, crop) - count(reference.segmentation_head)
    assert (ours == count(reference) - count(reference.segmentation_head)) == (architecture not in ("PSPNet", "DPT"))
    assert network.feature_channels == next(m for m in reference.segmentation_head.modules()
                                            if isinstance(m, torch.nn.Conv2d)).in_channels
    norms = [m for m in network.classifier.modules() if isinstance(m, DualBatchNorm2d)]
    assert len(norms) == 1, "one Mix-BN conv layer by default"
    assert network.eval()(torch.randn(2, 3, crop, crop)).logits.shape == (2, 5, crop, crop)


class SmpCase(NamedTuple):
    """An smp network to compare with smp's own model: ``patch_grid`` for DPT on a patch-14 ViT."""

    architecture: str
    encoder: str
    options: dict[str, Any]
    crop: int
    patch_grid: bool = False


SMALL_DPT_DECODER = {"decoder_intermediate_channels": (16, 16, 16, 16), "decoder_fusion_channels": 16}
"""DPT's decoder narrowed (smp's default is 28.6 M parameters): the same code, a fraction of the time."""
SMP_CASES = [
    SmpCase(name, SMALL_ENCODER.get(name, "resnet18"), SMALL_DPT_DECODER if name == "DPT" else {}, CROP.get(name, 64))
    for name in ARCHITECTURES
] + [SmpCase("DPT", "tu-vit_tiny_patch16_224", {**SMALL_DPT_DECODER, "patch_size": 14, "img_size": 56}, 56, patch_grid=True)]
"""Every architecture with its small encoder, and DPT on a (tiny, random) patch-14 ViT as DINOv2's."""


def smp_network(case: SmpCase, num_classes: int) -> SmpNetwork:
    """The plugin's network for ``case``."""
    options = {"architecture": case.architecture, "encoder": case.encoder, "options": case.options}
    return load_registry().get("network", "smp").build(options, num_classes=num_classes)


def smp_model_with_weights_of(network: SmpNetwork, case: SmpCase, num_classes: int) -> torch.nn.Module:
    """smp's own model for ``case`` with ``network``'s encoder and decoder state dicts loaded (strict,
    except for the encoder modules the plugin removed as unused: smp's model keeps them, random).

    On a patch-14 ViT smp's own DPT decoder cannot run (the plugin's docstring: its reassembly
    factors become fractional): its decoder is then the plugin's patch-grid one, copied, and
    the comparison covers smp's encoder, the wiring of its tokens and prefix tokens, and the head.
    """
    extra = {"dynamic_img_size": True} if case.architecture == "DPT" else {}
    model = getattr(smp, case.architecture)(encoder_name=case.encoder, encoder_weights=None, classes=num_classes,
                                            **extra, **case.options)
    # nn.Module's own loader: smp's ResNets override load_state_dict without returning its keys
    missing, unexpected = torch.nn.Module.load_state_dict(model.encoder, network.encoder.state_dict(), strict=False)
    assert not unexpected and all(removed_module_of(network.encoder, key) for key in missing), missing
    if case.patch_grid:
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 3, case.crop, case.crop))
        model.decoder = copy.deepcopy(network.decoder)
    model.decoder.load_state_dict(network.decoder.state_dict())
    return model


def removed_module_of(encoder: torch.nn.Module, key: str) -> str | None:
    """The name of the module of ``encoder`` that the plugin removed (as unused) and that held ``key``, if any."""
    parts = key.split(".")
    for end in range(1, len(parts)):
        name = ".".join(parts[:end])
        try:
            if isinstance(encoder.get_submodule(name), Removed):
                return name
        except AttributeError:
            return None
    return None


def weighted_sum(output: torch.Tensor) -> torch.Tensor:
    """A scalar of ``output`` with a different weight per element (a plain sum hides permutations)."""
    return (output * torch.linspace(-1.0, 1.0, output.numel()).reshape(output.shape)).sum()


@pytest.mark.parametrize("case", SMP_CASES, ids=lambda case: f"{case.architecture}-{case.encoder}-{case.crop}")
def test_the_features_are_smps_decoder_output_in_value_and_gradient(case: SmpCase) -> None:
    """smp's head on ``encode(x)`` is smp's model on ``x`` (same weights, train mode, dropout seeded),
    within RTOL/ATOL, and so are the gradients of a scalar of it w.r.t. every encoder, decoder and
    head parameter: the network is smp's encoder and decoder wired as smp wires them (every skip
    connection, every stage), not only of the same parameter count."""
    network = smp_network(case, 5).train()
    assert (network.size_divisor == 28) == case.patch_grid, "the patch-14 case takes the plugin's patch-grid path"
    model = smp_model_with_weights_of(network, case, 5).train()
    images = torch.randn(2, 3, case.crop, case.crop, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ours = model.segmentation_head(network.encode(images))
    torch.manual_seed(0)
    expected = model(images)
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"smp's head on encode(x) vs smp's model on x: {m}")
    parameters = {**{f"encoder.{name}": p for name, p in network.encoder.named_parameters()},
                  **{f"decoder.{name}": p for name, p in network.decoder.named_parameters()},
                  **{f"segmentation_head.{name}": p for name, p in model.segmentation_head.named_parameters()}}
    expected_parameters = dict(model.named_parameters())
    removed = {name: p for name, p in expected_parameters.items() if name not in parameters}
    if removed:  # what the plugin removed, smp's model has but never uses: not even in its graph
        unused = torch.autograd.grad(weighted_sum(expected), list(removed.values()), allow_unused=True, retain_graph=True)
        assert all(gradient is None for gradient in unused), [n for n, g in zip(removed, unused) if g is not None]
        assert all(removed_module_of(network.encoder, name.removeprefix("encoder.")) for name in removed), list(removed)
    assert bool(removed) == (case.architecture in ("PSPNet", "DPT")), list(removed)[:5]
    expected_parameters = {name: p for name, p in expected_parameters.items() if name not in removed}
    gradients = assert_same_gradients(weighted_sum(ours), parameters, weighted_sum(expected), expected_parameters)
    assert {name.partition(".")[0] for name in reached(gradients)} == {"encoder", "decoder", "segmentation_head"}


def test_the_perturbations_gradient_reaches_the_encoder_through_the_clean_features(tiny_recipe: Path) -> None:
    network = build_model(smp_recipe(tiny_recipe, "FPN"), load_registry(), 3).train()
    out = StudentPass(network)(torch.randn(4, 3, 64, 64), perturb=lambda features, classify, clean: features + 0.5, num_perturbed=2)
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
        StudentPass(network).train()(torch.randn(2, 3, 50, 50), perturb=lambda f, c, clean: f, num_perturbed=1)


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


BENCHED_BY_DEFAULT = ("Unet", "DPT")
"""The architectures the default run benches (a CNN and the ViT); the others are ``slow``: every
architecture trains through the same iteration in :func:`test_every_smp_architecture_trains_two_ddfp_steps`."""


@pytest.mark.parametrize(
    "architecture",
    [a if a in BENCHED_BY_DEFAULT else pytest.param(a, marks=pytest.mark.slow) for a in ARCHITECTURES],
)
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
    official = {key: value + 0.25 if key.endswith(("norm.weight", "norm1.weight")) else value for key, value in official.items()}
    torch.save(official, tmp_path / "dinov2_vits14_pretrain.pth")
    network = load_registry().get("network", "smp").build(
        {"architecture": "DPT", "encoder": "tu-vit_small_patch14_dinov2", "weights": str(tmp_path / "dinov2_vits14_pretrain.pth")},
        num_classes=3,
    )
    loaded = network.encoder.model.state_dict()
    assert torch.equal(loaded["blocks.11.norm1.weight"], official["blocks.11.norm1.weight"]) and "mask_token" not in loaded
    # the file's final norm loads too, then goes with the module: DPT reads the blocks' outputs before it
    assert "norm.weight" not in loaded and isinstance(network.encoder.model.norm, Removed)


def test_the_dinov2_recipe_builds_unimatch_v2s_small_dpt() -> None:
    recipe_path = Path(__file__).parent.parent / "recipes" / "ddfp_dinov2_pascal.toml"
    recipe = resolve_components(load_recipe(recipe_path, ["model.weights=none"]), load_registry())
    network = build_model(recipe, load_registry(), 21)
    assert network.size_divisor == 28 and recipe.train.crop_size % 28 == 0
    assert network.feature_channels == 64 and network.embedding_channels == 64
    # DINOv2 ViT-S/14 at its 518-pixel grid: 22.06 M (the release adds a 384-d mask_token, pretraining only),
    # less its final norm's 2 x 384, which DPT does not read (its head is already none: 0 classes)
    assert count(network.encoder) == 22_056_192 - 2 * 384


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
    err = capsys.readouterr().err
    assert ("train.perturb_at = 'encoder': [model] 'smp' with architecture = 'DPT', encoder = 'tu-vit_tiny_patch16_224'"
            " does not expose its encoder's maps") in err, "the architecture is named: smp's others have them"
    assert build_model(smp_recipe(tiny_recipe, "FPN"), load_registry(), 3).has_encoder_maps()


def ungraded_parameters(network: SmpNetwork, crop: int, perturb_at: str = "classifier") -> list[str]:
    """The parameters with ``requires_grad`` that a training forward with a perturbed view (the
    auxiliary classifier path included) and its backward leave without a gradient.

    DistributedDataParallel without ``find_unused_parameters`` (as the trainer wraps the student)
    fails on any of them, and they would sit in the optimizer and in checkpoints for nothing."""
    network.train()
    images = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    def shift(features, classify, clean):  # noqa: ANN001, ANN202 - at the encoder: the list of maps
        return [f + 1.0 for f in features] if isinstance(features, list) else features + 1.0

    out = StudentPass(network)(images, perturb=shift, num_perturbed=1, perturb_at=perturb_at)
    assert out.perturbed_logits is not None, "the perturbed view exists: the auxiliary classifier is used too"
    (weighted_sum(out.logits) + weighted_sum(out.perturbed_logits)).backward()
    return [name for name, p in network.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("case", SMP_CASES, ids=lambda case: f"{case.architecture}-{case.encoder}-{case.crop}")
def test_every_parameter_of_every_architecture_receives_a_gradient(case: SmpCase) -> None:
    """A parameter the forward never uses (encoder stages beyond the architecture's depth, a ViT's
    final norm and classification head under DPT) makes DDP without find_unused_parameters fail."""
    network = smp_network(case, 3)
    unused = ungraded_parameters(network, case.crop)
    assert not unused, f"{case.architecture} on {case.encoder}: {len(unused)} parameters get no gradient: {unused}"
    if network.has_encoder_maps():  # UniMatch's perturbation of the encoder's maps: the same parameters
        network.zero_grad(set_to_none=True)
        unused = ungraded_parameters(network, case.crop, perturb_at="encoder")
        assert not unused, f"{case.architecture} on {case.encoder}, perturbed at the encoder: {unused}"


ENCODER_FAMILIES = [
    SmpCase("Unet", "efficientnet-b0", {}, 64),  # full depth: its classification conv_head and _bn1 never run
    SmpCase("PSPNet", "mobilenet_v2", {}, 64),  # depth 3: features.7 to .18 of one Sequential (7 to 13 run, then discarded)
    SmpCase("PSPNet", "mit_b0", {}, 64),  # depth 3: a transformer's patch_embed3/4, block3/4, norm3/4
    SmpCase("PSPNet", "tu-resnet18", {}, 64),  # timm's feature wrapper already stops at the last stage used
    SmpCase("DPT", "tu-vit_tiny_patch16_224", {**SMALL_DPT_DECODER, "encoder_output_indices": [0, 1, 2, 3]}, 64),
]
"""Other encoders whose forward leaves modules unused (blocks 4 to 11 of the ViT: DPT reads blocks 0 to 3)."""


@pytest.mark.parametrize("case", ENCODER_FAMILIES, ids=lambda case: f"{case.architecture}-{case.encoder}")
def test_the_modules_an_encoder_never_runs_are_removed_whatever_the_encoder(case: SmpCase) -> None:
    network = smp_network(case, 3)
    unused = ungraded_parameters(network, case.crop)
    assert not unused, f"{case.architecture} on {case.encoder}: {len(unused)} parameters get no gradient: {unused}"
    removed = [name for name, module in network.encoder.named_modules() if isinstance(module, Removed)]
    assert bool(removed) == (case.encoder != "tu-resnet18"), removed


def test_encoder_weights_load_with_or_without_the_removed_modules_keys(tmp_path: Path) -> None:
    """PSPNet removes resnet18's layer3 and layer4: a file of the whole encoder (smp's, with them) and a
    file of the network's own encoder (without them) both load; a file without a key the network uses,
    or with a key of no module at all, is still refused."""
    whole = {key: value + 0.5 if value.is_floating_point() else value
             for key, value in smp_reference("PSPNet", 3).encoder.state_dict().items()}
    assert any(key.startswith("layer4.") for key in whole)

    def build(state: dict[str, torch.Tensor], name: str) -> SmpNetwork:
        torch.save(state, tmp_path / name)
        return load_registry().get("network", "smp").build(
            {"architecture": "PSPNet", "encoder": "resnet18", "weights": str(tmp_path / name)}, num_classes=3)

    network = build(whole, "whole.pth")
    loaded = network.encoder.state_dict()
    assert loaded and not any(key.startswith(("layer3.", "layer4.")) for key in loaded)
    assert all(torch.equal(value, whole[key]) for key, value in loaded.items())
    again = build(loaded, "own.pth").encoder.state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in again.items())
    with pytest.raises(SandboxError, match=r"missing \['layer2.0.conv1.weight'\]"):
        build({key: value for key, value in whole.items() if key != "layer2.0.conv1.weight"}, "missing.pth")
    with pytest.raises(SandboxError, match=r"unexpected \['layer5.0.conv1.weight'\]"):
        build({**whole, "layer5.0.conv1.weight": whole["layer2.0.conv1.weight"]}, "unexpected.pth")


def test_a_checkpoint_with_the_removed_modules_loads_and_predicts_the_same() -> None:
    """A state dict that still holds the removed modules (a checkpoint written before they were
    removed) loads strictly: their keys are ignored, every other key must be there."""
    case = SmpCase("PSPNet", "resnet18", {}, 64)
    network = smp_network(case, 3).eval()
    reference = smp_network(case, 3).eval()
    stale = {**network.state_dict(), **{f"encoder.{k}": v for k, v in smp_reference("PSPNet", 3).encoder.state_dict().items()
                                        if k.startswith(("layer3.", "layer4."))}}
    reference.load_state_dict(stale)
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(network(images).logits, reference(images).logits)
    with pytest.raises(RuntimeError, match="Missing key"):
        reference.load_state_dict({k: v for k, v in stale.items() if k != "encoder.layer2.0.conv1.weight"})


class DetachingEncoder(torch.nn.Module):
    """A stage whose result is used, but detached: its parameters get no gradient, yet removing it
    would change the output. And a head that is never run."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.frozen, self.head = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 1), torch.nn.Linear(4, 2)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        return [images, x + self.frozen(x).detach()]


class ValueDependentEncoder(torch.nn.Module):
    """A forward that reads a value (``.item()``): it cannot run on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = torch.nn.Conv2d(3, 4, 1), torch.nn.Linear(4, 2)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        return [images, x * float(x.mean().item() > 0)]


@pytest.mark.parametrize("encoder", [DetachingEncoder, ValueDependentEncoder])
def test_an_encoder_whose_unused_modules_cannot_be_removed_safely_is_kept_whole(encoder: type, caplog: pytest.LogCaptureFixture) -> None:
    module = encoder().eval()
    images = torch.randn(1, 3, 8, 8)
    before, state = module(images), copy.deepcopy(module.state_dict())
    assert remove_unused_encoder_modules(module) == []
    assert "is kept whole" in caplog.text
    assert not any(isinstance(m, Removed) for m in module.modules()) and module.state_dict().keys() == state.keys()
    assert all(torch.equal(a, b) for a, b in zip(module(images), before))
