"""Build a run's components from a resolved recipe and the registry."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.api import ConsistencyLoss, DensityEstimator, Perturbation, SegmentationSource
from sandbox.data.views import LabeledTrainSet, UnlabeledTrainSet
from sandbox.model.deeplabv3plus import DeepLabV3Plus
from sandbox.recipe import Recipe
from sandbox.registry import Registry


def build_dataset(recipe: Recipe, registry: Registry) -> SegmentationSource:
    """The recipe's dataset."""
    return registry.get("dataset", recipe.dataset.name).build(recipe.dataset.options())


def build_model(recipe: Recipe, registry: Registry, num_classes: int) -> DeepLabV3Plus:
    """DeepLabV3+ with the recipe's backbone and decoder settings."""
    backbone = registry.get("backbone", recipe.backbone.name).build(recipe.backbone.options())
    settings = recipe.model
    return DeepLabV3Plus(
        backbone,
        num_classes,
        aspp_dilations=settings.aspp_dilations,
        channels=settings.channels,
        low_level_channels=settings.low_level_channels,
        dropout=settings.dropout,
        mix_bn=settings.mix_bn,
    )


@dataclass
class MethodComponents:
    """The method's plugins: perturbation, optional density estimator, consistency losses."""

    perturbation: Perturbation
    density: DensityEstimator | None
    strong_loss: ConsistencyLoss
    perturbed_loss: ConsistencyLoss


def build_method(recipe: Recipe, registry: Registry, num_classes: int, embedding_dim: int) -> MethodComponents:
    """The perturbation, its density estimator if it uses one, and the two consistency losses."""
    perturbation = registry.get("perturbation", recipe.perturbation.name).build(recipe.perturbation.options())
    density = None
    if perturbation.uses_density:
        density = registry.get("density", recipe.density.name).build(
            recipe.density.options(),
            feature_dim=embedding_dim,
            num_classes=num_classes,
            total_steps=max(recipe.train.iters - recipe.train.warmup_iters, 1),
        )
    strong, perturbed = recipe.consistency.strong, recipe.consistency.perturbed
    return MethodComponents(
        perturbation,
        density,
        registry.get("consistency", strong.name).build(strong.options()),
        registry.get("consistency", perturbed.name).build(perturbed.options()),
    )


def build_train_views(source: SegmentationSource, recipe: Recipe) -> tuple[LabeledTrainSet, UnlabeledTrainSet]:
    """The augmented labeled and unlabeled training views of ``source``."""
    train = recipe.train
    return (
        LabeledTrainSet(source.labeled, train.crop_size, train.scale_range, recipe.seed, source.ignore_index),
        UnlabeledTrainSet(source.unlabeled, train.crop_size, train.scale_range, recipe.seed + 1),
    )
