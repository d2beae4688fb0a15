"""The DeepLabV3+ of DDFP: shapes at any input size, Mix BN, the perturbation point."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sandbox_builtins.backbones import TimmBackbone
from sandbox.api import DualBatchNorm2d
from sandbox_builtins.deeplabv3plus import DeepLabV3Plus
from sandbox.train.student_pass import StudentPass, classify


def small_model(mix_bn: bool = True) -> DeepLabV3Plus:
    torch.manual_seed(0)
    return DeepLabV3Plus(TimmBackbone("resnet18"), 5, [6, 12, 18], channels=32, low_level_channels=8, mix_bn=mix_bn)


def test_any_input_size_gives_logits_of_that_size() -> None:
    model = small_model().eval()
    for size in ((65, 65), (97, 130), (513, 513)):
        out = model(torch.randn(1, 3, *size))
        assert out.logits.shape == (1, 5, *size)
        assert out.embedding.shape[1] == 32
        assert out.embedding.shape[-2:] == model.backbone(torch.randn(1, 3, *size))[0].shape[-2:]


def test_classifier_input_is_aspp_head_plus_low_level_features() -> None:
    model = small_model()
    features = model.encode(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 32 + 8, 16, 16)
    assert model.feature_channels == 40


def test_perturbed_view_uses_auxiliary_batchnorm_only() -> None:
    model = small_model().train()
    norms = [m for m in model.classifier.modules() if isinstance(m, DualBatchNorm2d)]
    assert len(norms) == 2
    main_before = [m.main.running_mean.clone() for m in norms]
    aux_before = [m.auxiliary.running_mean.clone() for m in norms]
    features = model.encode(torch.randn(2, 3, 64, 64))
    classify(model, features, auxiliary=True)
    assert all(torch.equal(m.main.running_mean, b) for m, b in zip(norms, main_before))
    assert all(not torch.equal(m.auxiliary.running_mean, b) for m, b in zip(norms, aux_before))
    assert not any(m.use_auxiliary for m in norms), "the auxiliary mode must not leak out of the call"


def test_forward_with_perturbation_returns_the_perturbed_view_of_the_last_images() -> None:
    model = small_model().train()
    seen = {}

    def perturb(features, classify, clean):
        seen["shape"] = features.shape
        seen["aux"] = classify(features).logits.shape
        return features + 1.0

    out = StudentPass(model)(torch.randn(5, 3, 64, 64), perturb=perturb, num_perturbed=2)
    assert seen["shape"] == (2, 40, 16, 16) and seen["aux"] == (2, 5, 16, 16)
    assert out.perturbed_logits.shape == (2, 5, 64, 64)
    assert StudentPass(model)(torch.randn(2, 3, 64, 64), perturb=lambda f, c, clean: None, num_perturbed=2).perturbed_logits is None


def test_parameter_groups_split_backbone_and_decoder() -> None:
    model = small_model()
    encoder, decoder = model.encoder_parameters(), model.decoder_parameters()
    assert len(encoder) + len(decoder) == len(list(model.parameters()))
    assert {id(p) for p in encoder}.isdisjoint(id(p) for p in decoder)


def paper_model() -> DeepLabV3Plus:
    return DeepLabV3Plus(TimmBackbone("resnet101s"), 21, [6, 12, 18])


def test_paper_model_has_the_reference_parameter_count() -> None:
    model = paper_model()
    encoder = sum(p.numel() for p in model.backbone.parameters())
    total = sum(p.numel() for p in model.parameters())
    auxiliary = sum(p.numel() for name, p in model.named_parameters() if ".auxiliary." in name)
    assert abs(encoder / 42.62e6 - 1) < 1e-3, encoder
    assert abs((total - auxiliary) / 62.09e6 - 1) < 1e-3, total - auxiliary
    assert model.backbone.low_channels == 256 and model.backbone.high_channels == 2048
    assert model.aspp.out_channels == 1280 and model.feature_channels == 304


@pytest.mark.slow
def test_paper_model_shapes_at_513() -> None:
    model = paper_model().eval()
    with torch.no_grad():
        features = model.encode(torch.randn(1, 3, 513, 513))
        out = model(torch.randn(1, 3, 513, 513))
    assert features.shape == (1, 304, 129, 129)
    assert out.logits.shape == (1, 21, 513, 513) and out.embedding.shape == (1, 256, 129, 129)


def test_the_students_pass_loads_a_networks_own_state_and_predicts_as_the_network() -> None:
    """A checkpoint saved before the pass existed (no ``network.`` prefix) loads; in eval mode the pass
    predicts what the network's own forward predicts."""
    torch.manual_seed(0)
    saved = small_model().state_dict()
    torch.manual_seed(1)
    student = StudentPass(small_model())
    student.load_state_dict(saved)
    assert all(torch.equal(student.state_dict()[f"network.{key}"], value) for key, value in saved.items())
    student.load_state_dict(student.state_dict())  # its own keys load as they are
    images = torch.randn(2, 3, 64, 64)
    student.eval()
    assert torch.equal(student(images).logits, student.network(images).logits)


def test_an_in_place_perturbation_replaces_every_images_logits_through_the_auxiliary_statistics() -> None:
    """UniMatch V2's pass (``perturbed_view = "strong_in_place"``): the logits are those of the moved
    features, classified with the auxiliary statistics (Mix BN); the main statistics are left alone."""
    model = small_model().train()
    reference = copy.deepcopy(model)
    images = torch.randn(3, 3, 64, 64)
    torch.manual_seed(1)  # the same dropout masks
    out = StudentPass(model)(images, perturb=lambda f, c, clean: f + 1.0, num_perturbed=3, in_place=True)
    torch.manual_seed(1)
    expected = classify(reference, reference.encode(images) + 1.0, auxiliary=True).logits
    assert out.perturbed_logits is None
    torch.testing.assert_close(out.logits, F.interpolate(expected, size=(64, 64), mode="bilinear", align_corners=True))
    for ours, theirs in zip(model.classifier.modules(), reference.classifier.modules()):
        if isinstance(ours, DualBatchNorm2d):
            assert torch.equal(ours.main.running_mean, theirs.main.running_mean)
            assert torch.equal(ours.auxiliary.running_mean, theirs.auxiliary.running_mean)
