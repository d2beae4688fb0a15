"""DeepLabV3+ as in DDFP (ASPP, head, low-level projection, two-conv classifier), any encoder.

The perturbation point is the 304-channel input of the classifier (``encode`` -> ``classify``).
The classifier's BatchNorms have auxiliary statistics used for the perturbed view ("Mix BN").
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.api import Backbone, ClassifierOutput


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


class DualBatchNorm2d(nn.Module):
    """A BatchNorm with a main and an auxiliary set of statistics and affine parameters."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.BatchNorm2d(channels)
        self.auxiliary = nn.BatchNorm2d(channels)
        self.use_auxiliary = False

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with the auxiliary statistics while ``use_auxiliary`` is set."""
        return self.auxiliary(x) if self.use_auxiliary else self.main(x)


class SegmentationOutput(NamedTuple):
    """What a forward pass returns."""

    logits: Tensor
    """``(B, K, H, W)`` at the input size."""
    embedding: Tensor
    """``(B, D, H/4, W/4)``: the classifier's last features, where densities are estimated."""
    perturbed_logits: Tensor | None
    """Logits of the perturbed view ``(B_p, K, H, W)``, or None without a perturbation."""


PerturbFn = Callable[[Tensor, Callable[[Tensor], ClassifierOutput]], "Tensor | None"]


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ of DDFP.md on top of any :class:`sandbox.api.Backbone`."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        aspp_dilations: list[int],
        channels: int = 256,
        low_level_channels: int = 48,
        dropout: float = 0.1,
        mix_bn: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.high_channels, channels, aspp_dilations)
        self.head = nn.Sequential(conv_bn_relu(self.aspp.out_channels, channels, 3), nn.Dropout2d(dropout))
        self.reduce = conv_bn_relu(backbone.low_channels, low_level_channels, 1)
        norm: Callable[[int], nn.Module] = DualBatchNorm2d if mix_bn else nn.BatchNorm2d
        fused = channels + low_level_channels
        self.classifier = nn.Sequential(
            nn.Conv2d(fused, channels, 3, padding=1, bias=False), norm(channels), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm(channels), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
        )
        self.final = nn.Conv2d(channels, num_classes, 1)
        self.feature_channels = fused
        self.embedding_channels = channels

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the backbone (trained at the base learning rate)."""
        return list(self.backbone.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the backbone (trained at the head learning rate)."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]

    def encode(self, images: Tensor) -> Tensor:
        """The classifier's input: ASPP head output upsampled and fused with low-level features."""
        low, high = self.backbone(images)
        x = self.head(self.aspp(high))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([x, self.reduce(low)], dim=1)

    @contextmanager
    def auxiliary_bn(self) -> Iterator[None]:
        """Within this context the classifier normalises with its auxiliary statistics."""
        norms = [m for m in self.classifier.modules() if isinstance(m, DualBatchNorm2d)]
        for m in norms:
            m.use_auxiliary = True
        try:
            yield
        finally:
            for m in norms:
                m.use_auxiliary = False

    def classify(self, features: Tensor, auxiliary: bool = False) -> ClassifierOutput:
        """Run the classifier on ``encode``'s output (with auxiliary BN statistics if asked)."""
        if auxiliary:
            with self.auxiliary_bn():
                embedding = self.classifier(features)
        else:
            embedding = self.classifier(features)
        return ClassifierOutput(self.final(embedding), embedding)

    def forward(self, images: Tensor, perturb: PerturbFn | None = None, num_perturbed: int = 0) -> SegmentationOutput:
        """Predict ``images``; with ``perturb``, also the perturbed view of the last ``num_perturbed``.

        ``perturb(features, classify_auxiliary)`` receives the classifier inputs of those images
        and a function running the classifier with auxiliary statistics; it returns perturbed
        features or None. Doing all of this in one forward keeps a DDP-wrapped model correct.
        """
        size = images.shape[-2:]
        features = self.encode(images)
        output = self.classify(features)
        perturbed_logits = None
        if perturb is not None and num_perturbed > 0:
            perturbed = perturb(features[-num_perturbed:], lambda x: self.classify(x, auxiliary=True))
            if perturbed is not None:
                perturbed_logits = upsample(self.classify(perturbed, auxiliary=True).logits, size)
        logits = output.logits
        if self.training and perturbed_logits is None:
            logits = logits + self._auxiliary_tie()
        return SegmentationOutput(upsample(logits, size), output.embedding, perturbed_logits)

    def _auxiliary_tie(self) -> Tensor | float:
        """Zero that depends on the auxiliary BatchNorm parameters.

        Without a perturbed view they would get no gradient, and DistributedDataParallel would
        need ``find_unused_parameters`` (a graph walk every step) to tolerate that.
        """
        auxiliary = [p for m in self.classifier.modules() if isinstance(m, DualBatchNorm2d) for p in m.auxiliary.parameters()]
        return sum(p.sum() for p in auxiliary) * 0.0 if auxiliary else 0.0


def upsample(logits: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Bilinear upsampling (align_corners=True, as the reference) to ``size``."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
