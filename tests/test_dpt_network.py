"""The ``dpt`` network: UniMatch V2's DINOv2 + DPT head, checked against transcriptions of V2's maths.

Tiny models only (a 16-wide, 4-block DINOv2-shaped ViT); the real widths are built on the meta
device, where nothing is computed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.api import SegmentationNetwork
from sandbox.cli import main
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry
from sandbox_builtins.dpt import SIZES, build_dpt, dinov2_position_embedding

VIT = {"embed_dim": 16, "depth": 4, "num_heads": 2, "img_size": 56}
"""A DINOv2-shaped ViT small enough for tests: 4 x 4 patches of 14 at its trained size."""
TINY = {"layers": [0, 1, 2, 3], "features": 8, "out_channels": [4, 8, 16, 32], "encoder_options": VIT}


def tiny(seed: int = 0, **options) -> SegmentationNetwork:
    torch.manual_seed(seed)
    return build_dpt(3, **{**TINY, **options}).eval()


def images(*size: int, seed: int = 1) -> Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Transcriptions of UniMatch V2's maths (model/backbone/dinov2.py, model/util/blocks.py,
# model/semseg/dpt.py), written from torch layers, with V2's module names
# ----------------------------------------------------------------------------------------------


def v2_position_embedding(pos_embed: Tensor, height: int, width: int, patch: int = 14) -> Tensor:
    """DinoVisionTransformer.interpolate_pos_encoding for an image of ``height x width`` pixels."""
    trained = pos_embed.shape[1] - 1
    rows, cols = height // patch, width // patch
    if rows * cols == trained and height == width:
        return pos_embed
    side = math.sqrt(trained)
    grid = pos_embed[:, 1:].float().reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (rows, cols)
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)), dim=1)


def v2_intermediate_layers(vit: nn.Module, x: Tensor, blocks: list[int]) -> list[Tensor]:
    """get_intermediate_layers(x, blocks) (norm=True, no class token), reshaped as V2's head does."""
    batch, _, height, width = x.shape
    proj = vit.patch_embed.proj
    tokens = F.conv2d(x, proj.weight, proj.bias, stride=14).flatten(2).transpose(1, 2)
    tokens = torch.cat((vit.cls_token.expand(batch, -1, -1), tokens), dim=1)
    tokens = tokens + v2_position_embedding(vit.pos_embed, height, width)
    taken = []
    for index, block in enumerate(vit.blocks):
        tokens = block(tokens)
        if index in blocks:
            taken.append(vit.norm(tokens))
    outputs = [out[:, 1:] for out in taken]
    return [out.permute(0, 2, 1).reshape(batch, -1, height // 14, width // 14) for out in outputs]


def v2_residual_unit(features: int, bn: bool) -> nn.Module:
    unit = nn.Module()
    unit.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
    unit.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
    if bn:
        unit.bn1, unit.bn2 = nn.BatchNorm2d(features), nn.BatchNorm2d(features)
    return unit


def v2_residual(unit: nn.Module, x: Tensor) -> Tensor:
    y = unit.conv1(nn.ReLU(False)(x))
    y = unit.bn1(y) if hasattr(unit, "bn1") else y
    y = unit.conv2(nn.ReLU(False)(y))
    y = unit.bn2(y) if hasattr(unit, "bn2") else y
    return y + x


def v2_fusion(block: nn.Module, *xs: Tensor, size=None) -> Tensor:
    output = xs[0]
    if len(xs) == 2:
        output = output + v2_residual(block.resConfUnit1, xs[1])
    output = v2_residual(block.resConfUnit2, output)
    modifier = {"scale_factor": 2} if size is None else {"size": size}
    output = F.interpolate(output, **modifier, mode="bilinear", align_corners=True)
    return block.out_conv(output)


def v2_dpt_head(nclass: int, in_channels: int, features: int, use_bn: bool, out_channels: list[int]) -> nn.Module:
    """V2's DPTHead's modules (every one V2 builds, refinenet4's never-called resConfUnit1 included)."""
    head = nn.Module()
    head.projects = nn.ModuleList(nn.Conv2d(in_channels, c, kernel_size=1, stride=1, padding=0) for c in out_channels)
    head.resize_layers = nn.ModuleList([
        nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4, padding=0),
        nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2, padding=0),
        nn.Identity(),
        nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
    ])
    head.scratch = nn.Module()
    for i, c in enumerate(out_channels):
        setattr(head.scratch, f"layer{i + 1}_rn", nn.Conv2d(c, features, kernel_size=3, stride=1, padding=1, bias=False))
    for i in range(1, 5):
        block = nn.Module()
        block.out_conv = nn.Conv2d(features, features, kernel_size=1, stride=1, padding=0, bias=True)
        block.resConfUnit1, block.resConfUnit2 = v2_residual_unit(features, use_bn), v2_residual_unit(features, use_bn)
        setattr(head.scratch, f"refinenet{i}", block)
    head.scratch.output_conv = nn.Sequential(
        nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1), nn.ReLU(True),
        nn.Conv2d(features, nclass, kernel_size=1, stride=1, padding=0),
    )
    return head


def v2_dpt_head_forward(head: nn.Module, out_features: list[Tensor], patch_h: int, patch_w: int) -> Tensor:
    """DPTHead.forward on the ViT's tokens ``(B, N, C)``: class scores at 8x the patch grid."""
    out = []
    for i, x in enumerate(out_features):
        x = x.permute(0, 2, 1).reshape((x.shape[0], x.shape[-1], patch_h, patch_w))
        out.append(head.resize_layers[i](head.projects[i](x)))
    s = head.scratch
    layer_1_rn, layer_2_rn, layer_3_rn, layer_4_rn = s.layer1_rn(out[0]), s.layer2_rn(out[1]), s.layer3_rn(out[2]), s.layer4_rn(out[3])
    path_4 = v2_fusion(s.refinenet4, layer_4_rn, size=layer_3_rn.shape[2:])
    path_3 = v2_fusion(s.refinenet3, path_4, layer_3_rn, size=layer_2_rn.shape[2:])
    path_2 = v2_fusion(s.refinenet2, path_3, layer_2_rn, size=layer_1_rn.shape[2:])
    path_1 = v2_fusion(s.refinenet1, path_2, layer_1_rn)
    return s.output_conv(path_1)


def v2_head_state_in_our_names(head: nn.Module) -> dict[str, Tensor]:
    """V2's head state dict under this plugin's names (refinenet4.resConfUnit1 has no counterpart)."""
    renamed = {}
    for key, value in head.state_dict().items():
        if key.startswith("scratch.refinenet4.resConfUnit1."):
            continue
        key = key.replace("scratch.output_conv.0.", "classifier.0.").replace("scratch.output_conv.2.", "final.")
        renamed[key if key.startswith(("classifier.", "final.")) else f"head.{key}"] = value
    return renamed


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


# ----------------------------------------------------------------------------------------------
# Shapes and the network API
# ----------------------------------------------------------------------------------------------


def test_outputs_have_the_input_size_with_sides_multiple_of_14_or_not() -> None:
    network = tiny()
    assert network.size_divisor == 14 and network.has_encoder_maps()
    assert network.feature_channels == network.embedding_channels == 8
    with torch.no_grad():
        for height, width in ((56, 56), (70, 98), (50, 61)):
            output = network(images(height, width))
            rows, cols = -(-height // 14), -(-width // 14)
            assert output.logits.shape == (2, 3, height, width)
            assert output.embedding.shape == (2, 8, 8 * rows, 8 * cols), "path_1: twice the stride-4 map"
            maps = network.extract(images(14 * rows, 14 * cols))
            assert [tuple(m.shape) for m in maps] == [(2, 16, rows, cols)] * 4
        padded = F.pad(images(50, 61), (0, 9, 0, 6))
        assert torch.allclose(network(images(50, 61)).logits, network(padded).logits[..., :50, :61], atol=1e-6), \
            "an input not a multiple of 14 is padded bottom/right, its logits cropped"


def test_decode_of_extract_is_encode() -> None:
    network = tiny()
    with torch.no_grad():
        x = images(56, 84)
        assert torch.equal(network.decode(network.extract(x)), network.encode(x))


def test_every_parameter_gets_a_gradient() -> None:
    """The host's DistributedDataParallel has no find_unused_parameters: V2's never-called
    refinenet4.resConfUnit1 and DINOv2's mask_token must not exist."""
    network = tiny().train()
    network(images(56, 70)).logits.sum().backward()
    assert [name for name, p in network.named_parameters() if p.grad is None] == []


# ----------------------------------------------------------------------------------------------
# Encoder: the intermediate maps and the position embeddings
# ----------------------------------------------------------------------------------------------


def test_intermediate_maps_are_the_chosen_blocks_normed_without_class_token() -> None:
    network = tiny(layers=[1, 3, 4, 5], encoder_options={**VIT, "depth": 6})
    vit = network.backbone
    with torch.no_grad():
        for size in ((56, 56), (42, 84)):  # the trained grid, and one whose position embeddings are interpolated
            x = images(*size)
            expected = v2_intermediate_layers(vit, x, [1, 3, 4, 5])
            for ours, theirs in zip(network.extract(x), expected, strict=True):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        x = images(56, 56)
        timms = vit.forward_intermediates(x, indices=[1, 3, 4, 5], norm=True, output_fmt="NCHW", intermediates_only=True)
        for ours, theirs in zip(network.extract(x), timms, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_position_embeddings_are_interpolated_as_dinov2_not_as_timm() -> None:
    from timm.layers import resample_abs_pos_embed

    pos_embed = torch.randn(1, 37 * 37 + 1, 8, generator=torch.Generator().manual_seed(0))
    assert dinov2_position_embedding(pos_embed, (37, 37), (37, 37), torch.float32) is pos_embed
    for rows, cols in ((46, 46), (32, 32), (36, 50)):
        ours = dinov2_position_embedding(pos_embed, (37, 37), (rows, cols), torch.float32)
        torch.testing.assert_close(ours, v2_position_embedding(pos_embed, rows * 14, cols * 14), rtol=0, atol=1e-6)
        timms = resample_abs_pos_embed(pos_embed, (rows, cols), (37, 37), num_prefix_tokens=1)
        assert (ours - timms).abs().max() > 0.1, "timm's resampling differs (what the docstring says)"


# ----------------------------------------------------------------------------------------------
# Head: V2's DPTHead
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_bn", [False, True])
def test_head_computes_v2s_dpt_head(use_bn: bool) -> None:
    network = tiny(use_bn=use_bn)
    torch.manual_seed(5)
    reference = v2_dpt_head(3, 16, 8, use_bn, [4, 8, 16, 32])
    for module in reference.modules():  # BatchNorm statistics that are not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2), module.weight.data.uniform_(0.5, 2)
    network.load_state_dict({**network.backbone.state_dict(prefix="backbone."), **v2_head_state_in_our_names(reference)})
    reference.eval()
    for rows, cols in ((4, 4), (5, 7)):  # odd grids: the stride-2 resize rounds up, fusions resize to the next map
        maps = [torch.randn(2, 16, rows, cols, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        with torch.no_grad():
            ours = network.final(network.classifier(network.decode(maps)))
            theirs = v2_dpt_head_forward(reference, [m.flatten(2).transpose(1, 2) for m in maps], rows, cols)
        assert ours.shape == (2, 3, 8 * rows, 8 * cols)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


V2_TABLES = {  # unimatch_v2.py's model_configs and dpt.py's intermediate_layer_idx; DINOv2's widths and depths
    "small": {"features": 64, "out_channels": [48, 96, 192, 384], "layers": (2, 5, 8, 11), "embed_dim": 384, "depth": 12},
    "base": {"features": 128, "out_channels": [96, 192, 384, 768], "layers": (2, 5, 8, 11), "embed_dim": 768, "depth": 12},
    "large": {"features": 256, "out_channels": [256, 512, 1024, 1024], "layers": (4, 11, 17, 23), "embed_dim": 1024, "depth": 24},
    "giant": {"features": 384, "out_channels": [1536] * 4, "layers": (9, 19, 29, 39), "embed_dim": 1536, "depth": 40},
}


@pytest.mark.parametrize("size", list(V2_TABLES))
def test_each_size_has_v2s_head_but_its_unused_residual_unit(size: str) -> None:
    v2 = V2_TABLES[size]
    with torch.device("meta"):
        network = build_dpt(21, size=size)
        reference = v2_dpt_head(21, v2["embed_dim"], v2["features"], False, v2["out_channels"])
    assert (network.backbone.embed_dim, len(network.backbone.blocks), network.layers) == (v2["embed_dim"], v2["depth"], v2["layers"])
    head = count(network.parameters()) - count(network.encoder_parameters())
    f = v2["features"]
    assert head == count(reference.parameters()) - (2 * (9 * f * f + f))  # V2's refinenet4.resConfUnit1
    assert network.feature_channels == network.embedding_channels == f


# ----------------------------------------------------------------------------------------------
# Weights: the DINOv2 release's file format
# ----------------------------------------------------------------------------------------------


def release_file(path: Path, size: str = "small", seed: int = 7, **vit_options) -> nn.Module:
    """Save a tiny timm DINOv2 ViT under the release's key names (mask_token; giant: SwiGLU w12/w3)
    at ``path`` and return it."""
    torch.manual_seed(seed)
    source = timm.create_model(SIZES[size].model, pretrained=False, num_classes=0, **{**VIT, **vit_options}).eval()
    state = {key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.") if size == "giant" else key: value
             for key, value in source.state_dict().items()}
    torch.save({**state, "mask_token": torch.zeros(1, source.embed_dim)}, path)
    return source


@pytest.mark.parametrize("size", ["small", "giant"])
def test_a_dinov2_release_file_loads_and_its_path_follows_size(size: str, tmp_path: Path) -> None:
    vit = {**VIT, "embed_dim": 24} if size == "giant" else VIT  # SwiGLU: an even hidden width (24 * 16/3)
    source = release_file(tmp_path / f"dinov2_{size}.pth", size, **vit)
    network = tiny(size=size, weights=str(tmp_path / "dinov2_{size}.pth"), encoder_options=vit)
    x = images(56, 56)
    with torch.no_grad():
        expected = source.forward_intermediates(x, indices=TINY["layers"], norm=True, intermediates_only=True)
        for ours, theirs in zip(network.extract(x), expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    state = network.backbone.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in source.state_dict().items())


@pytest.mark.parametrize("case", ["wider", "shallower", "extra key", "other grid", "not a state dict", "absent"])
def test_a_file_that_does_not_fit_is_one_error_naming_it(case: str, tmp_path: Path) -> None:
    path = tmp_path / "dinov2.pth"
    if case == "wider":
        release_file(path, embed_dim=24)
    elif case == "shallower":
        release_file(path, depth=3)
    elif case == "other grid":  # timm's filter would resample it silently
        release_file(path, img_size=70)
    elif case == "extra key":
        release_file(path)
        torch.save({**torch.load(path), "head.weight": torch.zeros(3, 16)}, path)
    elif case == "not a state dict":
        torch.save([torch.zeros(1)], path)
    error = FileNotFoundError if case == "absent" else ValueError
    with pytest.raises(error, match=str(path)) as raised:
        tiny(weights=str(path))
    assert "\n" not in str(raised.value)


# ----------------------------------------------------------------------------------------------
# Options and the registry
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, key", [
    ({"size": "huge"}, "size"),
    ({"mix_bn": True}, "mix_bn"),
    ({"layers": [0, 1, 2]}, "layers"),
    ({"layers": [0, 1, 1, 3]}, "layers"),
    ({"layers": [0, 1, 2, 3], "encoder_options": {**VIT, "depth": 5}}, "layers must end at the ViT's last block"),
    ({"features": 0}, "features"),
    ({"out_channels": [4, 8, 16]}, "out_channels"),
    ({"encoder_options": {**VIT, "pretrained": True}}, "encoder_options.pretrained is set by"),
    ({"encoder_options": {**VIT, "reg_tokens": 4}}, "encoder_options"),
])
def test_bad_options_are_one_line_errors_naming_the_key(options: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key) as raised:
        tiny(**options)
    assert "\n" not in str(raised.value)


def test_the_registry_lists_and_builds_it(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plugins"])
    assert exit_info.value.code == 0 and " dpt " in capsys.readouterr().out
    component = load_registry().get("network", "dpt")
    assert isinstance(component.build(TINY, num_classes=3), SegmentationNetwork)
    with pytest.raises(SandboxError, match="size"):
        component.build({**TINY, "size": "huge"}, num_classes=3)
