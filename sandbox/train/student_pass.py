"""The student's forward pass as the training step runs it: perturbation routing, Mix BN and the DDP tie.

A segmentation network provides its parts (:class:`~sandbox.api.SegmentationNetwork`: ``encode``,
``classifier``, ``final``, optionally ``extract``/``decode``); the host composes them here, so a
network plugin cannot lose the perturbed view, the auxiliary BatchNorm statistics or the tie that
keeps DistributedDataParallel correct by overriding one of its methods. :class:`StudentPass` wraps
the network (it is the module Accelerate prepares and DDP wraps); its ``state_dict`` is the
network's under ``network.`` (a state without the prefix, saved before the pass existed, loads too).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from sandbox.api import (
    ClassifierOutput,
    DualBatchNorm2d,
    PerturbFn,
    SegmentationNetwork,
    SegmentationOutput,
    pad_to_multiple,
    upsample,
)

PREFIX = "network."


def dual_norms(classifier: nn.Module) -> list[DualBatchNorm2d]:
    """The :class:`DualBatchNorm2d` layers of ``classifier`` (none without Mix BN)."""
    return [module for module in classifier.modules() if isinstance(module, DualBatchNorm2d)]


@contextmanager
def auxiliary_statistics(classifier: nn.Module) -> Iterator[None]:
    """Within this context the :class:`DualBatchNorm2d` layers of ``classifier`` normalise with
    their auxiliary statistics and affine parameters (Mix BN: the perturbed view's own)."""
    norms = dual_norms(classifier)
    for norm in norms:
        norm.use_auxiliary = True
    try:
        yield
    finally:
        for norm in norms:
            norm.use_auxiliary = False


def classify(network: SegmentationNetwork, features: Tensor, auxiliary: bool = False) -> ClassifierOutput:
    """``network``'s classifier and final layer on features (with the auxiliary statistics if asked)."""
    if auxiliary:
        with auxiliary_statistics(network.classifier):
            embedding = network.classifier(features)
    else:
        embedding = network.classifier(features)
    return ClassifierOutput(network.final(embedding), embedding)


def auxiliary_tie(classifier: nn.Module) -> Tensor | float:
    """Zero that depends on the auxiliary BatchNorm parameters of ``classifier``.

    Without a perturbed view they would get no gradient, and DistributedDataParallel would
    need ``find_unused_parameters`` (a graph walk every step) to tolerate that.
    """
    auxiliary = [p for norm in dual_norms(classifier) for p in norm.auxiliary.parameters()]
    return sum(p.sum() for p in auxiliary) * 0.0 if auxiliary else 0.0


class StudentPass(nn.Module):
    """The student network's training forward pass (the module Accelerate prepares)."""

    def __init__(self, network: SegmentationNetwork) -> None:
        super().__init__()
        self.network = network
        self._register_load_state_dict_pre_hook(_add_prefix, with_module=True)

    def forward(
        self,
        images: Tensor,
        perturb: PerturbFn | None = None,
        num_perturbed: int = 0,
        perturb_at: str = "classifier",
        in_place: bool = False,
    ) -> SegmentationOutput:
        """Predict ``images``; with ``perturb``, also the perturbed view of the last ``num_perturbed``.

        ``perturb_at = "classifier"``: ``perturb(features, classify_auxiliary, clean)`` receives the
        classifier inputs of those images, a function running the classifier with auxiliary
        statistics and their clean classifier output; it returns perturbed features or None.
        ``perturb_at = "encoder"``: ``perturb`` receives the list of the network's ``extract`` maps of
        every image (no classifier to call, ``clean`` None) and returns their perturbed list; the
        clean and perturbed maps are decoded in one pass, as UniMatch does.
        ``in_place`` (UniMatch V2's step): every image of the pass is perturbed and its logits are
        those of the perturbed features (classified with the auxiliary statistics under Mix BN);
        no clean output of them is computed and ``perturbed_logits`` is None.
        Doing all of this in one forward keeps a DDP-wrapped model correct.
        """
        network = self.network
        size = images.shape[-2:]
        padded = pad_to_multiple(images, network.size_divisor)
        if perturb is not None and padded.shape != images.shape:
            raise ValueError(
                f"training inputs of {size[0]}x{size[1]} do not fit this network: sides must be multiples of "
                f"{network.size_divisor}"
            )
        perturbed_output = None
        if perturb is not None and in_place:
            if num_perturbed != images.shape[0]:
                raise ValueError(f"an in-place perturbation moves every image of the pass: {num_perturbed} of {images.shape[0]}")
            output = self._perturbed_in_place(padded, perturb, perturb_at)
        elif perturb is not None and num_perturbed > 0 and perturb_at == "encoder":
            output, perturbed_output = self._perturbing_encoder(padded, perturb, num_perturbed)
        else:
            features = network.encode(padded)
            output = classify(network, features)
            if perturb is not None and num_perturbed > 0:
                clean = ClassifierOutput(output.logits[-num_perturbed:], output.embedding[-num_perturbed:])
                perturbed = perturb(features[-num_perturbed:], lambda x: classify(network, x, auxiliary=True), clean)
                if perturbed is not None:
                    perturbed_output = classify(network, perturbed, auxiliary=True)
        perturbed_logits = None if perturbed_output is None else upsample(perturbed_output.logits, size)
        logits = output.logits
        if self.training and perturbed_logits is None:
            logits = logits + auxiliary_tie(network.classifier)
        logits = upsample(logits, padded.shape[-2:])[..., : size[0], : size[1]]
        return SegmentationOutput(logits, output.embedding, perturbed_logits)

    def _perturbed_in_place(self, images: Tensor, perturb: PerturbFn, perturb_at: str) -> ClassifierOutput:
        """The output of every image from its perturbed features (the clean ones when ``perturb`` gives None)."""
        network = self.network
        auxiliary = bool(dual_norms(network.classifier))
        if perturb_at == "encoder":
            maps = network.extract(images)
            moved = perturb(maps, _no_classifier, None)
            if moved is None:
                return classify(network, network.decode(maps))
            return classify(network, network.decode(list(moved)), auxiliary=auxiliary)
        features = network.encode(images)
        moved = perturb(features, lambda x: classify(network, x, auxiliary=True), None)
        if moved is None:
            return classify(network, features)
        return classify(network, moved, auxiliary=auxiliary)

    def _perturbing_encoder(
        self, images: Tensor, perturb: PerturbFn, num_perturbed: int
    ) -> tuple[ClassifierOutput, ClassifierOutput | None]:
        """Clean output of every image and perturbed output of the last ``num_perturbed``, the
        encoder's maps perturbed (UniMatch's feature perturbation)."""
        network = self.network
        maps = network.extract(images)
        perturbed = perturb(maps, _no_classifier, None)
        if perturbed is None:
            return classify(network, network.decode(maps)), None
        count = images.shape[0]
        decoded = network.decode([torch.cat([m, p]) for m, p in zip(maps, perturbed)])
        if dual_norms(network.classifier):  # Mix BN: own statistics
            return classify(network, decoded[:count]), classify(network, decoded[count:][-num_perturbed:], auxiliary=True)
        both = classify(network, decoded)  # one pass over clean and perturbed features, as UniMatch
        return (
            ClassifierOutput(both.logits[:count], both.embedding[:count]),
            ClassifierOutput(both.logits[count:][-num_perturbed:], both.embedding[count:][-num_perturbed:]),
        )


def _no_classifier(features: Tensor) -> ClassifierOutput:
    """The ``classify`` of an encoder-map perturbation: there is no classifier to call there."""
    raise ValueError("a perturbation of the encoder's maps has no classifier to call (train.perturb_at = 'encoder')")


def _add_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load a network's own state (keys without ``network.``) into a :class:`StudentPass`."""
    own = [key for key in state_dict if key.startswith(prefix) and not key[len(prefix):].startswith(PREFIX)]
    if own and len(own) == len([key for key in state_dict if key.startswith(prefix)]):
        for key in own:
            state_dict[prefix + PREFIX + key[len(prefix):]] = state_dict.pop(key)


def network_of(module: nn.Module) -> nn.Module:
    """The segmentation network inside ``module`` (a :class:`StudentPass`), or ``module`` itself."""
    return module.network if isinstance(module, StudentPass) else module


__all__: Sequence[str] = ["StudentPass", "auxiliary_statistics", "auxiliary_tie", "classify", "network_of"]
