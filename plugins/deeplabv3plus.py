"""The ``deeplabv3plus`` network: DeepLabV3+ as in DDFP (ASPP, head, low-level projection,
two-conv classifier) on the recipe's ``[backbone]``, the default network.

The perturbation point is the 304-channel input of the classifier (``encode`` -> ``classify``).
The classifier's BatchNorms have auxiliary statistics used for the perturbed view ("Mix BN").
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.api import Backbone, Register, SegmentationNetwork, classifier_layers, hookimpl


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU, padded to keep the spatial size."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: image pooling, 1x1 and dilated 3x3 branches, concatenated."""

    def __init__(self, in_channels: int, channels: int, dilations: list[int]) -> None:
        super().__init__()
        self.pooling = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, 1)] + [conv_bn_relu(in_channels, channels, 3, d) for d in dilations]
        )
        self.out_channels = channels * (len(dilations) + 2)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate every branch's output, ``(B, out_channels, h, w)``."""
        pooled = self.pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return torch.cat([pooled] + [branch(x) for branch in self.branches], dim=1)

    def pool(self, x: Tensor) -> Tensor:
        """The image-pooling branch, ``(B, channels, 1, 1)``.

        Its BatchNorm sees one value per channel and sample, so a training batch of one sample
        (a per-process batch of 1) has no batch statistics: BatchNorm would raise "Expected more
        than 1 value per channel". Such a batch is normalised with the running statistics instead
        (its affine parameters still train; the running statistics are not updated by it). A
        SyncBatchNorm gathers the statistics of every process and keeps its batch statistics.
        """
        average, conv, norm, relu = self.pooling
        y = conv(average(x))
        if self.training and y.shape[0] == 1 and not isinstance(norm, nn.SyncBatchNorm):
            assert isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None and norm.running_var is not None
            y = F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        else:
            y = norm(y)
        return relu(y)


class DeepLabV3Plus(SegmentationNetwork):
    """DeepLabV3+ of DDFP.md on top of any :class:`sandbox.api.Backbone`.

    The features (the perturbation point) are the ASPP head's output upsampled to stride 4 and
    concatenated with the projected low-level features (256 + 48 = 304 channels in DDFP); the
    classifier is two 3x3 conv-BN-ReLU-dropout layers (Mix BN), the embedding its 256-channel output.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        aspp_dilations: list[int],
        channels: int = 256,
        low_level_channels: int = 48,
        dropout: float = 0.1,
        mix_bn: bool = True,
        head_kernel: int = 3,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.high_channels, channels, aspp_dilations)
        self.head = nn.Sequential(conv_bn_relu(self.aspp.out_channels, channels, head_kernel), nn.Dropout2d(dropout))
        self.reduce = conv_bn_relu(backbone.low_channels, low_level_channels, 1)
        fused = channels + low_level_channels
        self.classifier = classifier_layers(fused, channels, 2, dropout, mix_bn)
        self.final = nn.Conv2d(channels, num_classes, 1)
        self.feature_channels = fused
        self.embedding_channels = channels

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the backbone (trained at the base learning rate)."""
        return list(self.backbone.parameters())

    def encode(self, images: Tensor) -> Tensor:
        """The classifier's input: ASPP head output upsampled and fused with low-level features."""
        return self.decode(self.extract(images))

    def extract(self, images: Tensor) -> list[Tensor]:
        """The backbone's stride-4 and deepest maps (UniMatch perturbs these: ``c1``, ``c4``)."""
        return list(self.backbone(images))

    def decode(self, maps: list[Tensor]) -> Tensor:
        """ASPP and head on the deepest map, upsampled and fused with the projected stride-4 map."""
        low, high = maps
        x = self.head(self.aspp(high))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([x, self.reduce(low)], dim=1)


def build_deeplabv3plus(
    num_classes: int,
    build_backbone: Callable[[], Backbone],
    aspp_dilations: list[int] = [6, 12, 18],
    channels: int = 256,
    low_level_channels: int = 48,
    dropout: float = 0.1,
    mix_bn: bool = True,
    head_kernel: int = 3,
) -> DeepLabV3Plus:
    """DDFP's DeepLabV3+ (ASPP, stride-4 fusion, two-layer Mix-BN classifier) on the recipe's [backbone].

    ``head_kernel``: the ASPP projection's kernel, 3 as DDFP (a 3x3 conv and dropout) or 1 as
    UniMatch's DeepLabV3+ (with ``dropout = 0`` and ``mix_bn = false`` it is UniMatch's network).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    for name, value in (("channels", channels), ("low_level_channels", low_level_channels), *(
            ("aspp_dilations", d) for d in aspp_dilations)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if head_kernel not in (1, 3):
        raise ValueError(f"head_kernel must be 1 or 3, got {head_kernel}")
    return DeepLabV3Plus(
        build_backbone(), num_classes, aspp_dilations, channels, low_level_channels, dropout, mix_bn, head_kernel
    )


@hookimpl
def sandbox_register_networks(register: Register) -> None:
    """Register DDFP's DeepLabV3+ as ``deeplabv3plus``."""
    register("deeplabv3plus", build_deeplabv3plus)
