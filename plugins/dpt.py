"""The ``dpt`` network: UniMatch V2's segmentation network, a DINOv2 ViT (timm's) with its DPT head.

Written after LiheYoung/UniMatch-V2 (``model/semseg/dpt.py``, ``model/util/blocks.py``,
``model/backbone/dinov2.py``, the tables of ``unimatch_v2.py``), with the same maths:

- Encoder: timm's ``vit_{size}_patch14_dinov2`` (built without download). Four intermediate blocks
  (V2's table: small/base 2, 5, 8, 11; large 4, 11, 17, 23; giant 9, 19, 29, 39), each output with
  the ViT's final norm applied and the class token dropped (DINOv2's ``get_intermediate_layers``
  with ``norm=True``), as ``(B, embed_dim, h, w)`` maps on the patch grid: :meth:`DPTNetwork.extract`,
  what UniMatch V2's complementary channel dropout multiplies.
- Head: V2's ``DPTHead``: 1x1 projections to ``out_channels``, resizing by 4, 2, 1 and 1/2 of the
  patch grid, 3x3 convs (no bias) to ``features``, four fusion blocks (residual conv units, optional
  BatchNorm ``use_bn``, bilinear upsampling with ``align_corners=True``, a 1x1 conv), then a 3x3 conv
  + ReLU (the ``classifier``; its output is the embedding) and a 1x1 conv to the classes (``final``).
  :meth:`DPTNetwork.encode` is the last fusion block's output (V2's ``path_1``, twice the resolution
  of the stride-4 map: 8 positions per patch), which the host's perturbations move.
  Logits are upsampled bilinearly (``align_corners=True``) to the input size, as V2 does to
  ``patch_h * 14 x patch_w * 14``.

Module names follow V2 (``head.projects``, ``head.resize_layers``, ``head.scratch.layer1_rn``,
``head.scratch.refinenet1.resConfUnit2.conv1``, ...), so that V2's head keys map one to one; V2's
``head.scratch.output_conv.0`` is ``classifier.0`` here and ``output_conv.2`` is ``final``.

Differences from V2, all outside its forward's maths:

- Position embeddings for inputs other than the ViT's ``img_size`` (518 = 37 x 37 patches) are
  interpolated as DINOv2 (V2's copy) does, reproduced here rather than timm's: bicubic with
  ``scale_factor = (grid + 0.1) / 37`` (the 0.1 offset, used as the sampling scale) and no
  antialiasing. timm's ``dynamic_img_size`` resamples to the target ``size`` (a sampling scale of
  ``grid / 37``) with ``antialias=True`` (a different cubic kernel, a = -0.5 instead of -0.75): on a
  random embedding the two differ by up to about 0.5 to 1 (embedding std 1).
- V2's ``refinenet4`` builds a ``resConfUnit1`` that its forward never calls (the deepest fusion
  block has no skip input), and DINOv2 a ``mask_token`` used only for masked pre-training; V2 trains
  with ``find_unused_parameters=True``. Neither exists here (the host's DistributedDataParallel has
  no ``find_unused_parameters``): the head has ``2 * (9 * features**2 + features)`` parameters fewer
  than V2's ``DPTHead``, the encoder ``embed_dim`` fewer (the release's ``mask_token`` is dropped).
- Inputs whose sides are not multiples of 14: V2's patch embedding drops the remainder and its
  logits cover ``patch_h * 14 x patch_w * 14``; here the host pads bottom/right to the next multiple
  and crops the logits back to the input size (``SegmentationNetwork.forward``).
- Without ``weights`` the ViT is timm's random init (layer scale 1e-5; V2 builds DINOv2 with 1.0
  but always loads the release over it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.api import Register, SegmentationNetwork, hookimpl
from sandbox.weights_files import read_weights_file

Size = Literal["small", "base", "large", "giant"]


@dataclass(frozen=True)
class SizeConfig:
    """One row of UniMatch V2's tables for a DINOv2 size."""

    model: str
    layers: tuple[int, ...]
    features: int
    out_channels: tuple[int, ...]


SIZES: dict[str, SizeConfig] = {
    "small": SizeConfig("vit_small_patch14_dinov2", (2, 5, 8, 11), 64, (48, 96, 192, 384)),
    "base": SizeConfig("vit_base_patch14_dinov2", (2, 5, 8, 11), 128, (96, 192, 384, 768)),
    "large": SizeConfig("vit_large_patch14_dinov2", (4, 11, 17, 23), 256, (256, 512, 1024, 1024)),
    "giant": SizeConfig("vit_giant_patch14_dinov2", (9, 19, 29, 39), 384, (1536, 1536, 1536, 1536)),
}
"""UniMatch V2's ``model_configs`` and ``intermediate_layer_idx``, with timm's model per size."""

RESERVED_ENCODER_OPTIONS = ("pretrained", "num_classes", "dynamic_img_size", "pretrained_cfg_overlay")
"""timm.create_model arguments the plugin sets itself."""

POSITION_OFFSET = 0.1
"""DINOv2's ``interpolate_offset`` (V2 builds DINOv2 with 0.1)."""


def dinov2_position_embedding(pos_embed: Tensor, trained_grid: tuple[int, int], grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """The class and patch position embeddings for a ``grid`` of patches, as DINOv2's
    ``interpolate_pos_encoding``: unchanged on the trained square grid, else the patch part resized
    bicubically with ``scale_factor = (side + 0.1) / trained side`` (no antialiasing), in float32."""
    (height, width), (trained_height, trained_width) = grid, trained_grid
    if height * width == trained_height * trained_width and height == width:
        return pos_embed
    patches = pos_embed[:, 1:].float().reshape(1, trained_height, trained_width, -1).permute(0, 3, 1, 2)
    scale = ((height + POSITION_OFFSET) / trained_height, (width + POSITION_OFFSET) / trained_width)
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, height * width, -1)
    return torch.cat([pos_embed[:, :1].float(), patches], dim=1).to(dtype)


class ResidualConvUnit(nn.Module):
    """ReLU, 3x3 conv (BatchNorm), ReLU, 3x3 conv (BatchNorm), plus the input (V2's ``ResidualConvUnit``)."""

    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        if use_bn:
            self.bn1 = nn.BatchNorm2d(features)
            self.bn2 = nn.BatchNorm2d(features)
        self.use_bn = use_bn

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(x))
        if self.use_bn:
            out = self.bn1(out)
        out = self.conv2(F.relu(out))
        if self.use_bn:
            out = self.bn2(out)
        return out + x


class FeatureFusionBlock(nn.Module):
    """V2's ``FeatureFusionBlock``: the skip map through a residual unit added to the path, a second
    residual unit, bilinear upsampling (x2, or to ``size``; ``align_corners=True``) and a 1x1 conv.

    ``skip=False`` (the deepest block, which receives no skip map) builds no first unit.
    """

    def __init__(self, features: int, use_bn: bool, skip: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if skip:
            self.resConfUnit1 = ResidualConvUnit(features, use_bn)
        self.resConfUnit2 = ResidualConvUnit(features, use_bn)

    def forward(self, path: Tensor, skip: Tensor | None = None, size: torch.Size | None = None) -> Tensor:
        if skip is not None:
            path = path + self.resConfUnit1(skip)
        path = self.resConfUnit2(path)
        resize: dict[str, Any] = {"scale_factor": 2} if size is None else {"size": size}
        path = F.interpolate(path, **resize, mode="bilinear", align_corners=True)
        return self.out_conv(path)


class DPTHead(nn.Module):
    """V2's ``DPTHead`` up to the last fusion block's output (``path_1``; the output convs are the
    network's ``classifier`` and ``final``)."""

    def __init__(self, embed_dim: int, features: int, out_channels: tuple[int, ...], use_bn: bool) -> None:
        super().__init__()
        self.projects = nn.ModuleList([nn.Conv2d(embed_dim, channels, 1) for channels in out_channels])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out_channels[0], out_channels[0], 4, stride=4),
            nn.ConvTranspose2d(out_channels[1], out_channels[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(out_channels[3], out_channels[3], 3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for index, channels in enumerate(out_channels, start=1):
            self.scratch.add_module(f"layer{index}_rn", nn.Conv2d(channels, features, 3, padding=1, bias=False))
        for index in range(1, 5):
            self.scratch.add_module(f"refinenet{index}", FeatureFusionBlock(features, use_bn, skip=index < 4))

    def forward(self, maps: list[Tensor]) -> Tensor:
        """``path_1`` ``(B, features, 8h, 8w)`` of the four ``(B, embed_dim, h, w)`` maps."""
        scratch = self.scratch
        layers = [resize(project(x)) for x, project, resize in zip(maps, self.projects, self.resize_layers)]
        rn1, rn2, rn3, rn4 = (getattr(scratch, f"layer{i}_rn")(x) for i, x in enumerate(layers, start=1))
        path = scratch.refinenet4(rn4, size=rn3.shape[2:])
        path = scratch.refinenet3(path, rn3, size=rn2.shape[2:])
        path = scratch.refinenet2(path, rn2, size=rn1.shape[2:])
        return scratch.refinenet1(path, rn1)


class DPTNetwork(SegmentationNetwork):
    """A DINOv2 ViT (timm) with UniMatch V2's DPT head, on the sandbox's network API."""

    def __init__(self, backbone: nn.Module, layers: tuple[int, ...], num_classes: int, features: int,
                 out_channels: tuple[int, ...], use_bn: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = layers
        self.head = DPTHead(backbone.embed_dim, features, out_channels, use_bn)
        self.classifier = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True))
        self.final = nn.Conv2d(features, num_classes, 1)
        self.feature_channels = self.embedding_channels = features
        self.size_divisor = backbone.patch_embed.patch_size[0]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The ViT's parameters (base learning rate)."""
        return list(self.backbone.parameters())

    def extract(self, images: Tensor) -> list[Tensor]:
        """The four intermediate blocks' outputs, final norm applied, class token dropped, as
        ``(B, embed_dim, h, w)`` maps on the patch grid (``h = H / patch``: sides must be multiples
        of the patch, as the host's padding makes them)."""
        vit = self.backbone
        tokens = vit.patch_embed(images)  # (B, h, w, C): dynamic_img_size
        batch, height, width, _ = tokens.shape
        tokens = torch.cat([vit.cls_token.expand(batch, -1, -1), tokens.flatten(1, 2)], dim=1)
        tokens = tokens + dinov2_position_embedding(vit.pos_embed, vit.patch_embed.grid_size, (height, width), tokens.dtype)
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
        maps = []
        for index, block in enumerate(vit.blocks):
            x = block(x)
            if index in self.layers:
                maps.append(vit.norm(x)[:, 1:].transpose(1, 2).reshape(batch, -1, height, width))
        return maps

    def decode(self, maps: list[Tensor]) -> Tensor:
        """The DPT head on :meth:`extract`'s maps: the last fusion block's output (V2's ``path_1``)."""
        return self.head(maps)

    def encode(self, images: Tensor) -> Tensor:
        """The classifier's input ``(B, features, 8h, 8w)``: ``decode(extract(images))``."""
        return self.decode(self.extract(images))


def check_vit(vit: nn.Module, model: str) -> None:
    """A ValueError unless ``vit`` is a DINOv2-style timm ViT: a class token, no register tokens,
    position embeddings over the class token and the patches, square patches."""
    patch = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    if (getattr(vit, "num_prefix_tokens", None) != 1 or getattr(vit, "cls_token", None) is None
            or getattr(vit, "no_embed_class", True) or getattr(vit, "pos_embed", None) is None
            or patch is None or patch[0] != patch[1]):
        raise ValueError(f"encoder_options: {model} must stay a DINOv2 ViT (one class token, no registers, "
                         "position embeddings including the class token, square patches)")


def load_dinov2_weights(vit: nn.Module, path: Path, model: str) -> None:
    """Load the DINOv2 release file ``path`` (facebook's keys; timm's are accepted too) into ``vit``
    with timm's own key conversion; every parameter must be in it with its shape (nothing is
    resampled); the release's ``mask_token`` is dropped. One ValueError naming the file otherwise."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    what = "dpt encoder weights"
    state = read_weights_file(path, what)
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
    expected = vit.state_dict()
    for key in ("pos_embed", "patch_embed.proj.weight"):  # timm's filter would resample these
        if key in state and isinstance(state[key], Tensor) and state[key].shape != expected[key].shape:
            raise ValueError(f"{what} {path} do not fit {model}: {key} has shape {tuple(state[key].shape)}, "
                             f"expected {tuple(expected[key].shape)}")
    try:
        state = checkpoint_filter_fn(dict(state), vit)
    except Exception as error:  # noqa: BLE001 - any content timm cannot convert: one line naming the file
        raise ValueError(f"{what} {path} do not fit {model} ({type(error).__name__}: {error})") from None
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [key for key in expected if key in state and getattr(state[key], "shape", None) != expected[key].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{what} {path} do not fit {model}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"other shapes {mismatched[:3]}")
    vit.load_state_dict(state)


def build_dpt(
    num_classes: int,
    size: Size = "small",
    weights: str | None = None,
    use_bn: bool = False,
    mix_bn: bool = False,
    layers: list[int] | None = None,
    features: int | None = None,
    out_channels: list[int] | None = None,
    encoder_options: dict[str, Any] = {},
) -> DPTNetwork:
    """UniMatch V2's network: a DINOv2 ViT (timm) with its DPT head; ``size`` small/base/large/giant.

    ``size`` picks timm's ``vit_{size}_patch14_dinov2``, the intermediate blocks (``layers``) and the
    head's widths (``features``, ``out_channels``) from V2's tables; ``layers``, ``features`` and
    ``out_channels`` override them (tiny test models). ``weights``: a local file (the DINOv2 release,
    e.g. ``dinov2_vits14_pretrain.pth``; ``{size}`` in it is replaced by ``size``), loaded into the
    ViT; ``none`` for none. ``use_bn``: BatchNorm in the fusion blocks' residual units (V2: false).
    ``mix_bn`` must stay false: V2's DPT head has no BatchNorm in its classifier.
    ``encoder_options``: further keyword arguments of ``timm.create_model`` (``img_size``, ``depth``, ...).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if mix_bn:
        raise ValueError("mix_bn = true: V2's DPT head has no BatchNorm in its classifier: nothing for Mix BN")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    config = SIZES[size]
    features = config.features if features is None else features
    if features < 1:
        raise ValueError(f"features must be positive, got {features}")
    widths = config.out_channels if out_channels is None else tuple(out_channels)
    if len(widths) != 4 or min(widths) < 1:
        raise ValueError(f"out_channels must be 4 positive widths, got {list(widths)}")
    reserved = [key for key in RESERVED_ENCODER_OPTIONS if key in encoder_options]
    if reserved:
        raise ValueError(f"encoder_options.{reserved[0]} is set by the dpt network, not by the recipe")
    try:
        vit = timm.create_model(config.model, pretrained=False, num_classes=0, dynamic_img_size=True, **encoder_options)
    except (TypeError, ValueError, AssertionError) as error:
        raise ValueError(f"encoder_options {encoder_options} rejected by timm's {config.model}: {error}") from None
    check_vit(vit, config.model)
    depth = len(vit.blocks)
    taken = config.layers if layers is None else tuple(layers)
    if len(taken) != 4 or list(taken) != sorted(set(taken)) or taken[0] < 0 or taken[-1] >= depth:
        raise ValueError(f"layers must be 4 increasing block indices below the ViT's depth {depth}, got {list(taken)}")
    if taken[-1] != depth - 1:
        raise ValueError(f"layers must end at the ViT's last block ({depth - 1}), got {list(taken)}: "
                         "later blocks would be parameters without gradients")
    if weights is not None and weights.strip().lower() not in ("", "none"):
        load_dinov2_weights(vit, Path(weights.replace("{size}", size)), config.model)
    return DPTNetwork(vit, taken, num_classes, features, widths, use_bn)


@hookimpl
def sandbox_register_networks(register: Register) -> None:
    """Register UniMatch V2's DINOv2 + DPT network as ``dpt``."""
    register("dpt", build_dpt)


__all__ = ["SIZES", "DPTHead", "DPTNetwork", "build_dpt", "dinov2_position_embedding"]
