"""The ``smp`` network: any segmentation-models-pytorch architecture, with any encoder it accepts.

The architecture's encoder and decoder are smp's own; its segmentation head (a conv, upsampling,
activation) is replaced by the sandbox classifier, so that the one definition of the training
step holds for every architecture: the *features* the perturbation moves are the decoder's
output (the head's input), the classifier (``classifier_layers`` x conv-BN-ReLU-dropout, Mix BN)
maps them to the *embedding* where densities are estimated, and a 1x1 conv gives the logits,
upsampled to the input size. Everything else in the model is smp's, parameter for parameter.

Encoders: smp's own (``resnet34``, ``efficientnet-b0``, ``mit_b0``, ...) and every timm model as
``tu-<name>`` (ViTs under ``DPT``). No weights are downloaded: ``weights`` names a local file
(a state dict of the encoder's model, as for the ``timm`` backbone).

DPT with a patch-14 ViT (DINOv2): smp 0.6 sizes DPT's reassembly by the encoder's stride assuming
patch 16 (factors 16/4, 16/8, 16/16, 16/32); with stride 14 they become fractional and the
decoder cannot run. The decoder is then built for a patch grid (factors 4, 2, 1, 1/2 of the grid,
as DPT and Depth Anything / UniMatch V2 do), and the logits are interpolated to the input size.
The grid must halve evenly, so input sides are multiples of twice the patch (28 for /14).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import segmentation_models_pytorch as smp
from torch import Tensor, nn

from sandbox.api import Register, SegmentationNetwork, classifier_layers, hookimpl
from sandbox_builtins.backbones import load_encoder_weights

Architecture = Literal[
    "Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet", "MAnet", "PAN", "UPerNet",
    "Segformer", "DPT",
]
ARCHITECTURES: tuple[str, ...] = Architecture.__args__
"""Every architecture segmentation-models-pytorch 0.6 provides."""


def head_in_channels(head: nn.Module) -> int:
    """The channel count an smp segmentation head receives (the decoder's output)."""
    first_conv = next(module for module in head.modules() if isinstance(module, nn.Conv2d))
    return first_conv.in_channels


class SmpNetwork(SegmentationNetwork):
    """An smp model's encoder and decoder, with the sandbox's Mix-BN classifier instead of its head."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        classifier_channels: int | None,
        classifier_depth: int,
        dropout: float,
        mix_bn: bool,
        size_divisor: int,
    ) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.decoder = model.decoder
        self.feature_channels = head_in_channels(model.segmentation_head)
        hidden = classifier_channels or self.feature_channels
        self.classifier = classifier_layers(self.feature_channels, hidden, classifier_depth, dropout, mix_bn)
        self.embedding_channels = hidden if classifier_depth > 0 else self.feature_channels
        self.final = nn.Conv2d(self.embedding_channels, num_classes, 1)
        self.size_divisor = size_divisor
        self.architecture = type(model).__name__

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters (base learning rate)."""
        return list(self.encoder.parameters())

    def encode(self, images: Tensor) -> Tensor:
        """The decoder's output: what smp's segmentation head would have received."""
        encoded = self.encoder(images)
        if isinstance(encoded, tuple):  # ViT encoders: (features, prefix tokens)
            return self.decoder(*encoded)
        return self.decoder(encoded)

    def extract(self, images: Tensor) -> list[Tensor]:
        """The encoder's feature maps (every stage smp's decoder reads)."""
        encoded = self.encoder(images)
        if isinstance(encoded, tuple):
            raise ValueError(f"{self.architecture}: a ViT encoder's tokens cannot be perturbed as maps; perturb at the classifier")
        return list(encoded)

    def decode(self, maps: list[Tensor]) -> Tensor:
        """smp's decoder on the encoder's maps."""
        return self.decoder(maps)

    def has_encoder_maps(self) -> bool:
        """Not for ViT encoders (DPT): their output is tokens with prefix tokens, not a list of maps."""
        return self.architecture != "DPT"


def patch_grid_dpt_decoder(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """DPT's decoder for a ViT whose patch is not 16: reassembly factors 4, 2, 1, 1/2 of the patch grid."""
    from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder

    encoder = model.encoder
    return DPTDecoder(
        encoder_out_channels=encoder.out_channels,
        encoder_output_strides=[16] * len(encoder.out_channels),  # one patch = 1/16 of the decoder's grid scale
        encoder_has_prefix_tokens=encoder.has_prefix_tokens,
        readout=options.get("decoder_readout", "cat"),
        intermediate_channels=options.get("decoder_intermediate_channels", (256, 512, 1024, 1024)),
        fusion_channels=options.get("decoder_fusion_channels", 256),
    )


CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.")
"""Keys of timm classifiers, which a feature encoder does not have (missing from a file is fine)."""


@contextmanager
def missing_keys_refused(path: Path | None) -> Iterator[None]:
    """While timm loads the weights file ``path``: parameters the file lacks are an error naming it.

    timm loads a feature encoder's file non-strictly (classifier heads are dropped) and only logs
    the encoder keys it did not find; a file of another model would otherwise leave them random.
    """
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("timm.models._builder")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    missing = [
        key
        for message in records if message.startswith("Missing keys (")
        for key in message[len("Missing keys ("):message.index(")")].split(", ")
        if not key.startswith(CLASSIFIER_PREFIXES)
    ]
    if path is not None and missing:
        raise ValueError(f"encoder weights {path} do not match the encoder: missing {', '.join(missing[:3])}")


def size_divisor(model: nn.Module, architecture: str) -> int:
    """What input sides must be multiples of: DPT halves the patch grid; CNNs need their stride."""
    stride = int(model.encoder.output_stride)
    if architecture == "DPT":
        return 2 * stride
    return stride if getattr(model, "requires_divisible_input_shape", True) else 1


def build_smp(
    num_classes: int,
    architecture: Architecture = "Unet",
    encoder: str = "resnet34",
    weights: str | None = None,
    classifier_channels: int | None = None,
    classifier_depth: int = 1,
    dropout: float = 0.1,
    mix_bn: bool = True,
    options: dict[str, Any] = {},
) -> SmpNetwork:
    """Any segmentation-models-pytorch architecture and encoder, with the sandbox's Mix-BN classifier.

    ``options`` are further keyword arguments of the smp architecture (``decoder_channels``,
    ``encoder_depth``, ...; timm keywords such as ``img_size`` for ``tu-`` encoders).
    ``classifier_channels`` defaults to the decoder's output width; ``classifier_depth`` is the
    number of conv-BN-ReLU layers before the 1x1 classifier (0: the features are the embedding).
    """
    if classifier_depth < 0 or (classifier_channels is not None and classifier_channels < 1):
        raise ValueError(f"classifier_depth must be >= 0 and classifier_channels >= 1, got {classifier_depth}, {classifier_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if weights is not None and weights.strip().lower() in ("", "none"):
        weights = None
    arguments = dict(options)
    if architecture == "DPT":
        arguments.setdefault("dynamic_img_size", True)  # whole-image evaluation at any (padded) size
    path = None if weights is None else Path(weights)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"encoder weights {path} do not exist")
    timm_file = path is not None and encoder.startswith("tu-")
    if timm_file:  # timm loads it while building the encoder: its key conversions, then the feature wrapper
        arguments["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
    try:
        with missing_keys_refused(path):
            model = getattr(smp, architecture)(
                encoder_name=encoder, encoder_weights="local file" if timm_file else None, classes=num_classes, **arguments
            )
    except KeyError as error:
        if timm_file:
            raise ValueError(f"encoder weights {path} do not fit encoder {encoder!r} (no key {error})") from None
        raise ValueError(f"smp {architecture} has no encoder {encoder!r} ({error}); timm models are 'tu-<name>'") from None
    if architecture == "DPT" and math.log2(model.encoder.output_stride) % 1:
        model.decoder = patch_grid_dpt_decoder(model, options)
    if path is not None and not timm_file:  # smp's own encoders: a state dict of the encoder
        load_encoder_weights(model.encoder, path)
    return SmpNetwork(model, num_classes, classifier_channels, classifier_depth, dropout, mix_bn, size_divisor(model, architecture))


@hookimpl
def sandbox_register_networks(register: Register) -> None:
    """Register ``smp``."""
    register("smp", build_smp)


__all__ = ["ARCHITECTURES", "SmpNetwork", "build_smp"]
