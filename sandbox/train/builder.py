"""Build a run's components from a resolved recipe and the registry."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from sandbox.api import Backbone, ConsistencyLoss, DensityEstimator, Perturbation, SegmentationNetwork, SegmentationSource
from sandbox.data.views import LabeledTrainSet, UnlabeledTrainSet
from sandbox.processes.collectives import process_rank
from sandbox.errors import SandboxError
from sandbox.recipe import OPTIONAL_TABLES, Recipe
from sandbox.registry import Registry


def build_dataset(recipe: Recipe, registry: Registry) -> SegmentationSource:
    """The recipe's dataset."""
    return registry.get("dataset", recipe.dataset.name).build(recipe.dataset.options())


def build_model(
    recipe: Recipe, registry: Registry, num_classes: int, tables_used: set[str] | None = None
) -> SegmentationNetwork:
    """The recipe's ``[model]`` network (on its ``[backbone]`` when the network takes one: then
    ``"backbone"`` is added to ``tables_used``)."""

    def build_backbone() -> Backbone:
        if tables_used is not None:
            tables_used.add("backbone")
        return registry.get("backbone", recipe.backbone.name).build(recipe.backbone.options())

    network = registry.get("network", recipe.model.name)
    return network.build(recipe.model.options(), num_classes=num_classes, build_backbone=build_backbone)


def check_crop_fits(recipe: Recipe, network: SegmentationNetwork) -> None:
    """A one-line error when ``train.crop_size`` is not a multiple of the network's ``size_divisor``."""
    crop, divisor = recipe.train.crop_size, network.size_divisor
    if crop % divisor:
        nearest = [size for size in (crop - crop % divisor, crop - crop % divisor + divisor) if size > 0]
        raise SandboxError(
            f"train.crop_size = {crop} does not fit [model] {recipe.model.name!r}: its input sides must be multiples "
            f"of {divisor}, e.g. {' or '.join(map(str, nearest))}"
        )


@dataclass
class MethodComponents:
    """The method's plugins: perturbation, optional density estimator, consistency losses."""

    perturbation: Perturbation
    density: DensityEstimator | None
    strong_loss: ConsistencyLoss
    perturbed_loss: ConsistencyLoss
    labels: dict[str, str] = field(default_factory=dict)
    """How errors name each of them (``Component.label``), by field name."""

    def label(self, role: str) -> str:
        """The label of the component in field ``role`` (its type name when built by hand)."""
        return self.labels.get(role) or f"{role} {type(getattr(self, role)).__name__}"


def unused_tables(tables_used: set[str], method: MethodComponents) -> set[str]:
    """The :data:`~sandbox.recipe.OPTIONAL_TABLES` a run does not use: ``[backbone]`` unless its network
    built one (``tables_used``, from :func:`build_model`), ``[density]`` without a density estimator."""
    used = tables_used | ({"density"} if method.density is not None else set())
    return set(OPTIONAL_TABLES) - used


def build_method(recipe: Recipe, registry: Registry, num_classes: int, embedding_dim: int) -> MethodComponents:
    """The perturbation, its density estimator if it uses one, and the two consistency losses."""
    components = {"perturbation": registry.get("perturbation", recipe.perturbation.name)}
    perturbation = components["perturbation"].build(recipe.perturbation.options())
    density = None
    if perturbation.uses_density:
        components["density"] = registry.get("density", recipe.density.name)
        density = components["density"].build(
            recipe.density.options(),
            feature_dim=embedding_dim,
            num_classes=num_classes,
            total_steps=max(recipe.train.iters - recipe.train.warmup_iters, 1),
        )
    strong, perturbed = recipe.consistency.strong, recipe.consistency.perturbed
    components["strong_loss"] = registry.get("consistency", strong.name)
    components["perturbed_loss"] = registry.get("consistency", perturbed.name)
    return MethodComponents(
        perturbation,
        density,
        components["strong_loss"].build(strong.options()),
        components["perturbed_loss"].build(perturbed.options()),
        {role: component.label for role, component in components.items()},
    )


def split_sizes(source: SegmentationSource, recipe: Recipe) -> str:
    """``data: [dataset] 'NAME': L labeled, U unlabeled, V val images``: the split sizes a run uses."""
    return (
        f"data: [dataset] {recipe.dataset.name!r}: {len(source.labeled)} labeled, {len(source.unlabeled)} unlabeled, "
        f"{len(source.val)} val images"
    )


def build_train_views(
    source: SegmentationSource, recipe: Recipe, announce: bool = True
) -> tuple[LabeledTrainSet, UnlabeledTrainSet]:
    """The augmented labeled and unlabeled training views of ``source``; with ``announce``, the first
    process prints :func:`split_sizes` on stderr first (training, beside its progress; ``bench --data``)."""
    if announce and process_rank() == 0:
        print(split_sizes(source, recipe), file=sys.stderr, flush=True)
    train = recipe.train
    return (
        LabeledTrainSet(source.labeled, train.crop_size, train.scale_range, recipe.seed, source.ignore_index),
        UnlabeledTrainSet(source.unlabeled, train.crop_size, train.scale_range, recipe.seed + 1, train.strong_views),
    )


def build_partner_view(source: SegmentationSource, recipe: Recipe) -> UnlabeledTrainSet:
    """The CutMix partners' unlabeled view (``train.cutmix_partners = "stream"``): the same images and
    augmentation as the unlabeled view, its own seed (a second, independent stream, as UniMatch's)."""
    train = recipe.train
    return UnlabeledTrainSet(source.unlabeled, train.crop_size, train.scale_range, recipe.seed + 2, train.strong_views)
