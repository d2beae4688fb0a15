"""Build a run's components from a resolved recipe and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    labels: dict[str, str] = field(default_factory=dict)
    """How errors name each of them (``Component.label``), by field name."""

    def label(self, role: str) -> str:
        """The label of the component in field ``role`` (its type name when built by hand)."""
        return self.labels.get(role) or f"{role} {type(getattr(self, role)).__name__}"


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


def build_train_views(source: SegmentationSource, recipe: Recipe) -> tuple[LabeledTrainSet, UnlabeledTrainSet]:
    """The augmented labeled and unlabeled training views of ``source``."""
    train = recipe.train
    return (
        LabeledTrainSet(source.labeled, train.crop_size, train.scale_range, recipe.seed, source.ignore_index),
        UnlabeledTrainSet(source.unlabeled, train.crop_size, train.scale_range, recipe.seed + 1),
    )
