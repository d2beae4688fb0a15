"""The timm backbone: strides, channels, output stride, and ImageNet weights from a local file."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from sandbox_builtins.backbones import TimmBackbone
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry


def test_strides_and_channels_at_output_stride_16_and_8() -> None:
    for output_stride, high_stride in ((16, 16), (8, 8)):
        backbone = TimmBackbone("resnet18", output_stride=output_stride)
        low, high = backbone(torch.randn(1, 3, 64, 64))
        assert low.shape == (1, backbone.low_channels, 16, 16)
        assert high.shape == (1, backbone.high_channels, 64 // high_stride, 64 // high_stride)


def test_weights_from_a_local_classification_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    classifier = timm.create_model("resnet18")
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in classifier.state_dict().items()}}, path)
    backbone = TimmBackbone("resnet18", weights=str(path))
    loaded = backbone.encoder.state_dict()
    assert torch.equal(loaded["conv1.weight"], classifier.state_dict()["conv1.weight"])
    assert torch.equal(loaded["layer4.1.bn2.running_var"], classifier.state_dict()["layer4.1.bn2.running_var"])


def test_missing_or_mismatched_weights_are_one_line_errors(tmp_path: Path) -> None:
    component = load_registry().get("backbone", "timm")
    with pytest.raises(SandboxError, match=r"backbone 'timm' .*weights .*nope\.pth does not exist"):
        component.build({"model": "resnet18", "weights": str(tmp_path / "nope.pth")})
    wrong = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), wrong)
    with pytest.raises(SandboxError, match=r"resnet34\.pth do not match the encoder"):
        component.build({"model": "resnet18", "weights": str(wrong)})
    with pytest.raises(SandboxError, match=r"timm has no model 'resnet999'"):
        component.build({"model": "resnet999"})


def test_weights_none_switches_a_recipe_path_off() -> None:
    assert TimmBackbone("resnet18", weights="none").low_channels == 64


@pytest.mark.parametrize("network", ["timm", "smp:resnet18", "smp:tu-resnet18"])
def test_weights_that_are_a_folder_or_not_weights_are_one_line_errors(tmp_path: Path, network: str) -> None:
    """Named, with what was expected; never torch's advice to load with ``weights_only=False``."""
    text = tmp_path / "weights.pth"
    text.write_text("not weights\n")
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    registry = load_registry()
    for path, expected in ((tmp_path, "is a folder, not a weights file"),
                           (text, r"cannot be read as weights \(UnpicklingError\); expected a state dict"),
                           (listed, "holds a list, not a state dict")):
        if network == "timm":
            build = lambda: registry.get("backbone", "timm").build({"model": "resnet18", "weights": str(path)})  # noqa: E731
        else:
            encoder = network.partition(":")[2]
            build = lambda: registry.get("network", "smp").build(  # noqa: E731
                {"architecture": "Unet", "encoder": encoder, "weights": str(path)}, num_classes=3)
        with pytest.raises(SandboxError, match=expected) as error:
            build()
        assert str(path) in str(error.value) and "weights_only" not in str(error.value) and "\n" not in str(error.value)
