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

Encoder modules whose parameters never reach the encoder's output are removed
(:func:`remove_unused_encoder_modules`, found by a forward and backward on the meta device): smp
builds its native encoders whole and skips the stages beyond ``encoder_depth`` (PSPNet's default 3
leaves a ResNet's ``layer3`` and ``layer4`` unused) or computes one and discards it (MobileNetV2,
EfficientNet); EfficientNets keep their classification ``conv_head``; a ViT keeps its final
``norm`` and ``head``, which DPT does not read (it reads the blocks' outputs before the final norm),
and the blocks after the last one it reads. Under DistributedDataParallel without
``find_unused_parameters`` (as the trainer wraps the student) such parameters are an error, and
they would sit in the optimizer and in checkpoints for nothing. Weight files may hold their keys or
not (they are ignored); every key of the modules kept is needed, as before.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn
from torch.func import functional_call

from sandbox.api import Register, SegmentationNetwork, classifier_layers, hookimpl
from sandbox.weights_files import load_encoder_weights, read_weights_file

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


class Removed(nn.Module):
    """Stands in for an encoder module whose parameters never reach the encoder's output: no
    parameters, no buffers, and its input passed through where the encoder still calls it (an
    encoder that computes a stage beyond its depth and discards it: MobileNetV2, EfficientNet).

    It keeps the parent's structure (indices of a ``Sequential``, lengths an encoder reads) and
    ignores the module's keys in a state dict, so that a weights file or checkpoint that still
    holds them (an encoder saved whole, smp's own) loads; the keys of the modules the network
    does use are checked as before.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """The removed module's weights are not needed: neither loaded nor reported unexpected."""

    def extra_repr(self) -> str:
        return self.name


def probe_size(encoder: nn.Module) -> tuple[int, int]:
    """An input size ``encoder`` accepts: a transformer's configured image size, else 256 x 256."""
    for module in encoder.modules():
        size = getattr(module, "img_size", None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return int(size[0]), int(size[1])
    return 256, 256


def tensors(output: Any) -> list[Tensor]:
    """The tensors in an encoder's output (a list of maps; ViTs: maps and prefix tokens)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [tensor for item in output for tensor in tensors(item)]
    return []


def probe(encoder: nn.Module) -> tuple[set[str], set[int], list[tuple[int, ...]]]:
    """One eval-mode forward and backward of ``encoder`` on the meta device (no memory, no arithmetic;
    its own tensors are neither read nor changed): the names of the modules it calls, the ids of
    the parameters that reach its output, and the shapes of its outputs."""
    names = {module: name for name, module in encoder.named_modules()}
    called: set[str] = set()
    hooks = [module.register_forward_pre_hook(lambda module, args: called.add(names[module])) for module in names]
    parameters = dict(encoder.named_parameters())
    probes = {name: torch.empty_like(p, device="meta").requires_grad_() for name, p in parameters.items()}
    buffers = {name: torch.empty_like(b, device="meta") for name, b in encoder.named_buffers()}
    modes = {module: module.training for module in names}
    encoder.eval()
    try:
        outputs = tensors(functional_call(encoder, {**probes, **buffers}, (torch.empty(1, 3, *probe_size(encoder), device="meta"),)))
    finally:
        for module, training in modes.items():
            module.training = training
        for hook in hooks:
            hook.remove()
    differentiable = [output for output in outputs if output.requires_grad]
    gradients = torch.autograd.grad(sum(output.sum() for output in differentiable), list(probes.values()), allow_unused=True) \
        if differentiable else [None] * len(probes)
    reached = {id(parameters[name]) for name, gradient in zip(probes, gradients) if gradient is not None}
    return called, reached, [tuple(output.shape) for output in outputs]


def remove_unused_encoder_modules(encoder: nn.Module) -> list[str]:
    """Replace by :class:`Removed` the outermost modules of ``encoder`` none of whose parameters reach
    its output (found by :func:`probe`); return their names.

    Checked afterwards: the encoder still runs, with outputs of the same shapes and, where a removed
    module was being called (its result discarded), of the same values on a random image. Where a
    check fails, or the probe cannot run, the encoder is kept whole, with a warning.
    """
    try:
        called, reached, shapes = probe(encoder)
        unused: list[str] = []
        for name, module in encoder.named_modules():  # parents first: nothing inside a removed module is listed
            owned = list(module.parameters())
            if (name and owned and not any(id(p) in reached for p in owned)
                    and not any(name.startswith(f"{outer}.") for outer in unused)):
                unused.append(name)
        if not unused:
            return []
        ran = any(c == name or c.startswith(f"{name}.") for name in unused for c in called)
        images = torch.randn(1, 3, *probe_size(encoder), generator=torch.Generator().manual_seed(0))
        expected = evaluate(encoder, images) if ran else []
        originals = {name: encoder.get_submodule(name) for name in unused}
        replace(encoder, {name: Removed(name) for name in unused})
        try:
            if probe(encoder)[2] != shapes or (ran and not all(map(torch.equal, evaluate(encoder, images), expected))):
                raise ValueError(f"its output changes without {', '.join(unused[:3])}")
        except Exception:
            replace(encoder, originals)
            raise
    except Exception as error:
        logging.getLogger(__name__).warning(
            "encoder %s is kept whole: cannot remove the modules its forward does not use (%s: %s); "
            "DistributedDataParallel without find_unused_parameters may then refuse it",
            type(encoder).__name__, type(error).__name__, error,
        )
        return []
    return unused


def replace(encoder: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Set each submodule of ``encoder`` named in ``modules`` to the module given."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(encoder.get_submodule(parent), child, module)


def evaluate(encoder: nn.Module, images: Tensor) -> list[Tensor]:
    """The encoder's output tensors for ``images`` in eval mode (its modules' modes restored)."""
    modes = {module: module.training for module in encoder.modules()}
    encoder.eval()
    try:
        with torch.no_grad():
            return tensors(encoder(images))
    finally:
        for module, training in modes.items():
            module.training = training


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
    if path is not None:
        read_weights_file(path, "encoder weights")  # a missing, unreadable or wrong file: one line naming it
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
    remove_unused_encoder_modules(model.encoder)  # tu- files are loaded by now (timm, into the whole model)
    if path is not None and not timm_file:  # smp's own encoders: a state dict of the encoder, with or without
        load_encoder_weights(model.encoder, path)  # the removed modules' keys; every key of the others is needed
    return SmpNetwork(model, num_classes, classifier_channels, classifier_depth, dropout, mix_bn, size_divisor(model, architecture))


@hookimpl
def sandbox_register_networks(register: Register) -> None:
    """Register ``smp``."""
    register("smp", build_smp)


__all__ = ["ARCHITECTURES", "Removed", "SmpNetwork", "build_smp", "remove_unused_encoder_modules"]
