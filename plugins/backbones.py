"""Backbone plugins: any timm encoder (``features_only``) at a chosen output stride."""

from __future__ import annotations

from pathlib import Path

import timm
from torch import Tensor

from sandbox.api import Backbone, Register, hookimpl
from sandbox.weights_files import load_encoder_weights


OUTPUT_STRIDES = (8, 16, 32)
"""The strides of the deepest features a timm encoder can be asked for (dilating its last stages)."""


class TimmBackbone(Backbone):
    """A timm encoder returning stride-4 and deepest features (``tu-`` encoders in smp terms)."""

    def __init__(
        self,
        model: str = "resnet18",
        output_stride: int = 16,
        pretrained: bool = False,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if weights is not None and weights.strip().lower() in ("", "none"):
            weights = None  # lets `--set backbone.weights=none` switch a recipe's weights off
        if model not in timm.list_models():
            raise ValueError(f"timm has no model {model!r}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride = {output_stride!r}: expected one of {', '.join(map(str, OUTPUT_STRIDES))}")
        try:
            self.encoder = timm.create_model(
                model, features_only=True, output_stride=output_stride, pretrained=pretrained and weights is None
            )
        except AssertionError as error:  # timm's own check of the strides a model can dilate to
            reason = f" ({error})" if str(error) else ""
            raise ValueError(f"output_stride = {output_stride}: timm model {model!r} does not support it{reason}") from None
        reductions = self.encoder.feature_info.reduction()
        if 4 not in reductions:
            raise ValueError(f"timm model {model!r} has no stride-4 features (strides {reductions})")
        self.low_index = reductions.index(4)
        channels = self.encoder.feature_info.channels()
        if weights is not None:
            load_encoder_weights(self.encoder, Path(weights))
        self.low_channels, self.high_channels = channels[self.low_index], channels[-1]
        self.output_stride = output_stride

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(stride-4 features, deepest features)``."""
        features = self.encoder(images)
        return features[self.low_index], features[-1]


@hookimpl
def sandbox_register_backbones(register: Register) -> None:
    """Register the timm backbone."""
    register("timm", TimmBackbone)
