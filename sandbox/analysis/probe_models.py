"""A trained run as ``sandbox probe`` sees it: student, teacher and density estimator, perturbations, crops.

The student, the EMA teacher and the online density estimator are read from the run's newest
complete checkpoint folder (``checkpoints/step_N``, written by Accelerate's ``save_state`` in
:meth:`sandbox.train.loop.Trainer._save_checkpoint`): the student is the prepared model
(``model.safetensors``), the teacher and the estimator are the objects the trainer registers for
checkpointing (:data:`~sandbox.rundir.directory.CHECKPOINTED_OBJECTS`). A run without a
checkpoint folder falls back to ``best.pt`` (else ``last.pt``) as both student and teacher, with no
estimator. Both networks are put in eval mode, as evaluation predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from sandbox.analysis.inference import inference_device
from sandbox.api import DensityEstimator, SegmentationNetwork, SegmentationSource
from sandbox.data.views import StreamSampler
from sandbox.errors import SandboxError
from sandbox.recipe import ComponentSpec, Recipe, resolve_components
from sandbox.registry import Registry
from sandbox.train.builder import MethodComponents, build_dataset, build_method, build_model, build_train_views
from sandbox.rundir.directory import RunDirectory, checkpointed_file
from sandbox.train.student_pass import PREFIX, StudentPass
from sandbox.train.weights import apply_weights, load_weights
from sandbox.weights_files import read_weights_file

STUDENT_FILES = ("model.safetensors", "pytorch_model.bin")
"""The student's file in a checkpoint folder (Accelerate's names, safetensors by default)."""



@dataclass
class ProbedRun:
    """A run's recipe, dataset and trained models, ready to be probed."""

    recipe: Recipe
    registry: Registry
    source: SegmentationSource
    student: StudentPass
    teacher: SegmentationNetwork
    density: DensityEstimator | None
    weights: str
    """Where the models come from (a checkpoint folder or a weights file), for the report."""
    device: torch.device


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint folder, or None."""
    folders = RunDirectory(run_dir).complete_checkpoints()
    return folders[-1] if folders else None


def read_state(path: Path) -> dict:
    """A state dict saved by ``torch.save`` or safetensors (:func:`~sandbox.weights_files.read_weights_file`);
    an unreadable or missing file is a one-line error."""
    try:
        return read_weights_file(path, "checkpoint file")
    except (ValueError, FileNotFoundError) as error:
        raise SandboxError(str(error)) from None


def student_state(folder: Path) -> tuple[dict[str, Tensor], Path]:
    """The student's weights in a checkpoint folder (without the ``network.`` prefix) and their file."""
    path = next((folder / name for name in STUDENT_FILES if (folder / name).is_file()), None)
    if path is None:
        raise SandboxError(f"checkpoint {folder} holds no student weights ({' or '.join(STUDENT_FILES)})")
    state = read_state(path)
    return {key.removeprefix(PREFIX): value for key, value in state.items()}, path


def load_run(run_dir: Path, recipe: Recipe, registry: Registry) -> ProbedRun:
    """Build ``recipe``'s dataset and networks and load the run's trained student, teacher and estimator."""
    source = build_dataset(recipe, registry)
    student, teacher = (build_model(recipe, registry, source.num_classes) for _ in range(2))
    method = build_method(recipe, registry, source.num_classes, student.embedding_channels)
    density = method.density
    folder = newest_checkpoint(run_dir)
    if folder is not None:
        state, path = student_state(folder)
        apply_weights(student, state, path, recipe.name)
        teacher_file = checkpointed_file(folder, "teacher")
        apply_weights(teacher, read_state(teacher_file), teacher_file, recipe.name)
        if density is not None:
            density.load_checkpoint_state(read_state(checkpointed_file(folder, "density")))
        weights = str(folder)
    else:
        directory = RunDirectory(run_dir)
        path = next((p for p in (directory.best_weights, directory.last_weights) if p.is_file()), None)
        if path is None:
            raise SandboxError(f"run {run_dir} has no checkpoint, best.pt or last.pt to probe")
        state = load_weights(path)
        apply_weights(student, state, path, recipe.name)
        apply_weights(teacher, state, path, recipe.name)
        density, weights = None, str(path)
    device = inference_device()
    if density is not None:
        density.to(device).eval()
    return ProbedRun(
        recipe, registry, source, StudentPass(student).to(device).eval(), teacher.to(device).eval(), density, weights, device
    )


def perturbation_recipe(recipe: Recipe, registry: Registry, name: str) -> Recipe:
    """``recipe`` with the perturbation ``name``: the run's own table when it is the run's, else the
    plugin's defaults; an unknown name is the registry's one-line error."""
    if name == recipe.perturbation.name:
        return recipe
    changed = recipe.model_copy(update={"perturbation": ComponentSpec(name=name)})
    return resolve_components(changed, registry, "--perturbation")


def build_probed_method(run: ProbedRun, name: str) -> MethodComponents:
    """The method components of the run's recipe with perturbation ``name``, built as training builds
    them, holding the run's trained estimator where the perturbation uses one."""
    recipe = perturbation_recipe(run.recipe, run.registry, name)
    method = build_method(recipe, run.registry, run.source.num_classes, run.student.network.embedding_channels)
    uses_density = method.perturbation.uses_density
    if uses_density and run.density is None:
        raise SandboxError(
            f"--perturbation {name!r} uses a density estimator, but run {run.recipe.name!r} has no trained one "
            f"(its perturbation {run.recipe.perturbation.name!r} does not use one, or it has no checkpoint folder)"
        )
    return replace(method, perturbation=method.perturbation.to(run.device), density=run.density if uses_density else None)


def unlabeled_crops(
    source: SegmentationSource, recipe: Recipe, count: int, progress: Callable[[int], None] | None = None
) -> tuple[Tensor, Tensor]:
    """The weak views ``(count, 3, c, c)`` and padding ``(count, c, c)`` of the first ``count`` crops of
    the unlabeled stream seeded by the recipe's seed (deterministic: the same crops every time);
    ``progress`` gets the number of crops read so far after each one."""
    if len(source.unlabeled) == 0:
        raise SandboxError(f"[dataset] {recipe.dataset.name!r} has no unlabeled images to probe")
    _, view = build_train_views(source, recipe, announce=False)
    positions = iter(StreamSampler(len(view), recipe.seed))
    samples = []
    for done in range(1, count + 1):
        samples.append(view[next(positions)])
        if progress is not None:
            progress(done)
    return torch.stack([sample[0] for sample in samples]), torch.stack([sample[2] for sample in samples])


__all__ = [
    "ProbedRun",
    "build_probed_method",
    "load_run",
    "newest_checkpoint",
    "perturbation_recipe",
    "unlabeled_crops",
]
