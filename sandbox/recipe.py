"""Recipes: TOML files describing a run, validated into typed settings.

A recipe may name a ``base`` recipe (a path relative to itself) whose tables it extends; a relative
``[dataset] root`` is relative to the recipe too (:func:`dataset_root_beside`).
``--set a.b=value`` overrides any key (``value`` is parsed as TOML, else taken as a string).
Component tables (``[dataset]``, ``[backbone]``, ``[density]``, ``[perturbation]``,
``[consistency.strong]``, ``[consistency.perturbed]``) hold ``name`` plus that plugin's options,
which :func:`resolve_components` checks against the registry and completes with defaults.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tomllib
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Collection, Literal, Union, get_args, get_origin

import pydantic
import tomli_w
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator,
)

from sandbox.errors import SandboxError, lower_first
from sandbox.renamed_values import rename_old_values, with_current_names
from sandbox.rundir.files import flatten_keys

if TYPE_CHECKING:
    from sandbox.registry import Registry  # imports torch (through sandbox.api): recipes are read without it


class Section(BaseModel):
    """A fixed recipe table: unknown keys are errors, and so is ``true``/``false`` for a number."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse ``true``/``false`` where a number goes (pydantic would read them as 1 and 0)."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and is_number(field.annotation):
            raise ValueError(f"expected a number, not {str(value).lower()}")
        return value


def is_number(annotation: Any) -> bool:
    """Whether a field of type ``annotation`` holds a number (``int``, ``float``, or one of them or None)."""
    if annotation in (int, float):
        return True
    arguments = [argument for argument in get_args(annotation) if argument is not type(None)]
    return get_origin(annotation) in (Union, UnionType) and bool(arguments) and all(is_number(a) for a in arguments)


def finite(value: Any) -> Any:
    """``value`` unchanged; an infinite or NaN float in it (in a list or table too) is an error: a
    recipe's numbers must be finite (and its saved ``recipe.toml`` must read back as it was written)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("expected a finite number")
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        finite(item)
    return value


class ComponentSpec(BaseModel):
    """A component table: the registered ``name`` plus the plugin's own options."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Annotated[Any, AfterValidator(finite)]] = Field(init=False)
    name: str

    def options(self) -> dict[str, Any]:
        """The plugin options (every key but ``name``)."""
        return dict(self.model_extra or {})


class ConsistencySection(Section):
    """Consistency losses for the strong view and for the perturbed view."""

    strong: ComponentSpec = ComponentSpec(name="ce")
    perturbed: ComponentSpec = ComponentSpec(name="ce")


class TrainSection(Section):
    """The training schedule and the mean-teacher hyper-parameters."""

    iters: PositiveInt = 2000
    warmup_iters: int = Field(200, ge=0)
    perturbation_start_iters: int = Field(0, ge=0)
    batch_size: PositiveInt = 4
    unlabeled_batch_size: PositiveInt = 4
    crop_size: PositiveInt = 321
    scale_range: tuple[float, float] = (0.5, 2.0)
    lr: float = Field(1e-3, gt=0)
    head_lr_multiplier: float = Field(10.0, gt=0)
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="SGD with momentum (DDFP, UniMatch) or AdamW (UniMatch V2's DINOv2 recipes)"
    )
    momentum: float = Field(0.9, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's betas")
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    ema_decay: float = Field(0.999, ge=0, le=1)
    teacher_mode: Literal["train", "eval"] = "train"
    teacher_statistics: Literal["own", "student", "ema"] = Field(
        "own",
        description=(
            "where the teacher's BatchNorm running statistics come from: 'own' (the reference: the EMA "
            "touches parameters only and the teacher's train-mode forward passes collect statistics of "
            "clean images, on the labeled images during warm-up), 'student' (copied from the student "
            "at every EMA update: statistics of strong, CutMixed images) or 'ema' (averaged like the "
            "parameters, with the same decay: UniMatch V2's unimatch_v2.py; integer buffers are copied)"
        ),
    )
    threshold: float = Field(0.95, ge=0, le=1)
    cutmix_p: float = Field(0.5, ge=0, le=1)
    cutmix_box: Literal["unimatch", "half"] = Field(
        "unimatch",
        description=(
            "'unimatch': UniMatch's obtain_cutmix_box (area uniform in 2-40%, height/width uniform in (0.3, 1/0.3), "
            "redrawn with its position until the box fits); 'half': half the image, width uniform "
            "in (W/2, W) (DDFP's reference code, from U2PL)"
        ),
    )
    cutmix_decision: Literal["sample", "batch"] = Field(
        "sample", description="cutmix_p decides for each sample, or once for the whole batch (the reference)"
    )
    pseudo_labels: Literal["teacher", "student"] = Field(
        "teacher",
        description=(
            "who predicts the weak view's pseudo-labels: the EMA teacher (DDFP, mean teacher) or the "
            "student itself, detached, in the same train-mode forward as the labeled images (UniMatch)"
        ),
    )
    strong_views: Literal[1, 2] = Field(1, description="strong views per unlabeled image, each CutMixed with its own box")
    cutmix_partners: Literal["batch", "flipped", "stream"] = Field(
        "batch",
        description=(
            "where CutMix pastes from: the next image of the same batch (DDFP), the batch in reverse order (image "
            "i takes from image B-1-i: UniMatch V2's flip(0)), or a second unlabeled stream whose "
            "pseudo-labels the pseudo-labelling model predicts in eval mode (UniMatch)"
        ),
    )
    perturbed_view: Literal["strong", "weak", "strong_in_place"] = Field(
        "strong",
        description=(
            "the view whose features are perturbed: the (first) strong view, as an extra perturbed copy with its "
            "own loss (DDFP), the weak view (UniMatch), or every strong view in place: the strong views' own "
            "predictions are of perturbed features and no view is added (UniMatch V2; their pass is apart from "
            "the labeled images', as unimatch_v2.py; perturbed_weight and strong_weight_alone play no part)"
        ),
    )
    perturb_at: Literal["classifier", "encoder"] = Field(
        "classifier",
        description=(
            "where features are perturbed: the classifier's input (DDFP) or each of the encoder's feature maps "
            "before the decoder (UniMatch; decoded together with the clean maps, perturbation applied to every image)"
        ),
    )
    supervised_weight: float = Field(1.0, ge=0)
    unsupervised_weight: float = Field(0.5, ge=0, description="the weight of the strong views' loss (their mean)")
    perturbed_weight: float = Field(0.5, ge=0)
    unsupervised_normalisation: Literal["trusted_pixels", "image_pixels"] = Field(
        "trusted_pixels",
        description=(
            "each unlabeled loss is summed over trusted pixels and divided by the number of trusted pixels "
            "(DDFP's reference) or of the crops' image (non-padding) pixels (UniMatch); the old names "
            "'trusted' and 'valid' still work"
        ),
    )
    loss_pixel_count: Literal["global", "per_process"] = Field(
        "global",
        description=(
            "on N processes, the pixel count each loss term is divided by: 'global', every process's count "
            "summed (N processes train what one process trains on the concatenated batch) or 'per_process', "
            "each process's own count, the processes' losses then averaged as DDP averages their gradients "
            "(what DDFP's and UniMatch's code do on their GPUs: not one process's loss on the concatenated "
            "batch, README \"What N processes compute\"); the same on one process"
        ),
    )
    threshold_inclusive: bool = Field(
        False, description="a confidence equal to threshold is trusted (UniMatch's >=) or not (DDFP's >)"
    )
    strong_weight_alone: float | None = Field(
        None,
        ge=0,
        description=(
            "the strong view's loss weight on steps without a perturbed view (before "
            "perturbation_start_iters, or a perturbation that makes none); None = unsupervised_weight + "
            "perturbed_weight, as the reference (loss = sup + unsup before its perturbation starts)"
        ),
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    channels_last: bool = Field(
        False,
        description=(
            "speed lever: the student's and the teacher's 4-D weights, and the images entering their encode "
            "(and extract), in channels_last (NHWC) memory format, the layout tensor-core convolutions prefer; "
            "the same computation, results equal up to floating-point rounding"
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "speed lever: torch.compile the student's and the teacher's compute, the network's encode (and "
            "extract/decode where it has them) and its classifier's and final layer's forward, on each instance "
            "(checkpoints keep their keys); the glue between them, the perturbation's callback, CutMix and the "
            "losses stay eager. The density estimator is not compiled: it sees a different number of pixels "
            "at every step (a recompilation each time), its update reads its loss on the host and the DDFP "
            "perturbation differentiates its log-density inside the student's pass. The first steps are slow "
            "(compilation); on a CPU it needs a C++ compiler; compiled dropout draws other random numbers than "
            "eager dropout"
        ),
    )
    optimizer_impl: Literal["default", "foreach", "fused"] = Field(
        "default",
        description=(
            "speed lever: the implementation of the optimizer's update (same arithmetic): 'default' (torch's "
            "choice: a loop over parameters on a CPU, 'foreach' on CUDA), 'foreach' (multi-tensor kernels) or "
            "'fused' (one kernel per parameter group; not with mixed_precision = 'fp16', whose overflowing "
            "steps the fused kernel would skip unseen by the skipped-update count and the EMA teacher)"
        ),
    )
    num_workers: int = Field(0, ge=0)
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default)")
    deterministic: bool = Field(
        False,
        description=(
            "deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN's deterministic kernels "
            "without autotuning, cuBLAS's fixed workspace): two runs on one machine, thread count and number of "
            "processes give bit-identical results; an operation without a deterministic implementation on the "
            "device stops the run with a line naming it"
        ),
    )
    log_every: PositiveInt = 10
    eval_every: PositiveInt = 500
    checkpoint_every: PositiveInt = 500
    checkpoints_kept: PositiveInt = Field(
        2,
        description=(
            "complete checkpoints (checkpoints/step_*) kept while training, the newest ones: a resume falls back "
            "to an older one only when the newer one is damaged"
        ),
    )
    keep_checkpoints_when_done: bool = Field(
        True,
        description=(
            "a finished run keeps its checkpoints (for --resume, and for sandbox probe, which reads the final "
            "student, teacher and density estimator from the newest one); false deletes checkpoints/ once "
            "summary.json is written, keeping best.pt and last.pt (eval, predict, plot, compare read those)"
        ),
    )
    max_consecutive_nonfinite: PositiveInt = 10
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]] = []
    reference_total_batch: PositiveInt | None = Field(
        None,
        description=(
            "the total labeled batch (batch_size x processes, or total_batch_size) that lr was tuned for; when "
            "set, lr is multiplied by that total / reference_total_batch (linear scaling rule)"
        ),
    )
    total_batch_size: PositiveInt | None = Field(
        None,
        description=(
            "the labeled images of one optimizer step over every process (the paper's total batch): N processes "
            "reach it by accumulating K = total_batch_size / (batch_size x N) micro-batches per step, each of "
            "batch_size labeled and unlabeled_batch_size unlabeled images, the images the processes of an N x K "
            "run would hold; a launch that cannot reach it exactly stops with a line saying so. None: "
            "batch_size x N, no accumulation (README \"The same training on fewer GPUs\")"
        ),
    )
    sync_bn: bool = Field(
        False,
        description=(
            "the student's and the teacher's BatchNorms normalise over every process's batch (one all-reduce per "
            "layer, no host-device synchronisation; see sync_bn_impl): N processes then train what one process "
            "trains on the concatenated batch"
        ),
    )
    sync_bn_impl: Literal["sandbox", "torch"] = Field(
        "sandbox",
        description=(
            "the class that synchronises BatchNorm with sync_bn: 'sandbox' (the project's, on every device, the one "
            "the parity tests prove) or 'torch' (torch's SyncBatchNorm, CUDA only: a host-device synchronisation "
            "in every BatchNorm layer of every training pass; kept for comparison)"
        ),
    )

    @field_validator("scale_range")
    @classmethod
    def _scale_range_is_an_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("expected [min, max] scale factors with 0 < min <= max, e.g. [0.5, 2.0]")
        return value

    @model_validator(mode="after")
    def _teacher_statistics_need_train_mode(self) -> "TrainSection":
        if self.teacher_statistics == "own" and self.teacher_mode == "eval":
            raise ValueError(
                "train.teacher_statistics = 'own' needs train.teacher_mode = 'train' (an eval-mode teacher "
                "collects no statistics); set teacher_statistics = 'student' to run the teacher in eval mode"
            )
        return self

    @model_validator(mode="after")
    def _warmup_within_iters(self) -> "TrainSection":
        if self.warmup_iters > self.iters:
            raise ValueError(
                f"train.warmup_iters ({self.warmup_iters}) > train.iters ({self.iters}): the run would end inside "
                "its warm-up; for supervised-only training set warmup_iters = iters"
            )
        return self

    @model_validator(mode="after")
    def _fused_optimizer_without_fp16(self) -> "TrainSection":
        if self.optimizer_impl == "fused" and self.mixed_precision == "fp16":
            raise ValueError(
                "train.optimizer_impl = 'fused' cannot run with train.mixed_precision = 'fp16': the fused kernel "
                "skips an overflowing step itself, unseen by the skipped-update count and the EMA teacher; use "
                "optimizer_impl = 'foreach' or mixed_precision = 'bf16'"
            )
        return self

    def strong_weight(self, perturbed_view: bool) -> float:
        """The strong view's loss weight on a step with or without a perturbed view (in place: always
        ``unsupervised_weight``, no view is added or dropped)."""
        if perturbed_view or self.perturbed_view == "strong_in_place":
            return self.unsupervised_weight
        if self.strong_weight_alone is None:
            return self.unsupervised_weight + self.perturbed_weight
        return self.strong_weight_alone


class EvalSection(Section):
    """Evaluation on the val part."""

    mode: Literal["whole", "center_crop", "sliding"] = "whole"
    crop_size: PositiveInt | None = None
    stride: PositiveInt | None = None
    batch_size: PositiveInt = 1
    model: Literal["teacher", "student", "both"] = Field(
        "teacher",
        description=(
            "the model evaluated after warm-up; 'both' evaluates the student and the teacher and counts "
            "the better, as the reference (max(prec_s, prec_t): a selection on val)"
        ),
    )


    @model_validator(mode="after")
    def _center_crop_needs_a_size(self) -> "EvalSection":
        if self.mode == "center_crop" and self.crop_size is None:
            raise ValueError("eval.mode = 'center_crop' needs eval.crop_size (the side of the centre crop)")
        return self


MAX_SEED = 2**32 - 1
"""The largest seed numpy's and torch's generators accept."""


class Recipe(Section):
    """A whole, validated recipe."""

    name: str
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the random seed (torch and numpy take 0 to 2**32 - 1)")
    output_dir: str = "runs"
    plugins: list[str] = []
    dataset: ComponentSpec
    backbone: ComponentSpec = ComponentSpec(name="timm", model="resnet18")
    density: ComponentSpec = ComponentSpec(name="glow")
    perturbation: ComponentSpec = ComponentSpec(name="ddfp")
    consistency: ConsistencySection = ConsistencySection()
    model: ComponentSpec = ComponentSpec(name="deeplabv3plus")
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()

    @field_validator("name")
    @classmethod
    def _name_stays_inside_output_dir(cls, value: str) -> str:
        parts = value.replace("\\", "/").split("/")
        if not value.strip() or value.startswith(("/", "\\")) or ".." in parts:
            raise ValueError("expected a run name inside output_dir (not empty, not absolute, no '..')")
        if "\0" in value:
            raise ValueError("expected a run name without NUL characters (no file system takes them)")
        return value

    @model_validator(mode="after")
    def _name_fits_the_file_system(self) -> "Recipe":
        limit = name_max(Path(self.output_dir))
        longest = max(self.name.replace("\\", "/").split("/"), key=lambda part: len(part.encode()))
        if len(longest.encode()) > limit:
            folder = "" if longest == self.name else f"its folder {shortened(longest)!r} is "
            raise ValueError(
                f"name = {shortened(self.name)!r}: {folder}{len(longest.encode())} bytes, more than the {limit} a "
                f"folder name may have on the file system of output_dir ({self.output_dir}); expected a shorter run name"
            )
        return self

    @model_validator(mode="after")
    def _windows_overlap(self) -> "Recipe":
        source = "eval.crop_size" if self.eval.crop_size else "train.crop_size"  # predict's crop without eval's
        crop = self.eval.crop_size or self.train.crop_size
        if self.eval.stride is not None and self.eval.stride > crop:
            raise ValueError(
                f"eval.stride ({self.eval.stride}) > {source} ({crop}): sliding windows that far apart leave the "
                "pixels between them unpredicted; expected a stride of at most the crop size"
            )
        return self

    def component_specs(self) -> dict[str, tuple[str, ComponentSpec]]:
        """``{table: (kind, spec)}`` for every component table."""
        return {
            "dataset": ("dataset", self.dataset),
            "model": ("network", self.model),
            "backbone": ("backbone", self.backbone),
            "density": ("density", self.density),
            "perturbation": ("perturbation", self.perturbation),
            "consistency.strong": ("consistency", self.consistency.strong),
            "consistency.perturbed": ("consistency", self.consistency.perturbed),
        }

    def to_toml(self, omit: Collection[str] = ()) -> str:
        """The recipe as TOML (no ``base``: every key is written out), without the top-level tables in
        ``omit`` (a run's saved recipe leaves out the :data:`OPTIONAL_TABLES` it did not use)."""
        data = self.model_dump(mode="json", exclude_none=True)
        for table in omit:
            data.pop(table, None)
        return tomli_w.dumps(data)

    def difference_from_saved(self, saved_toml: str) -> str:
        """``""`` when this recipe is a run's saved recipe ``saved_toml``, else the keys that differ
        (:func:`recipe_difference`)."""
        return recipe_difference(saved_toml, self)

    def as_saved_in(self, saved_toml: str) -> str:
        """This recipe as TOML without the :data:`OPTIONAL_TABLES` that ``saved_toml`` (a run's saved
        recipe) leaves out: its run did not use them, so they cannot make the two recipes differ."""
        saved = tomllib.loads(saved_toml)
        return self.to_toml(omit=[table for table in OPTIONAL_TABLES if table not in saved])


NAME_MAX_BYTES = 255
"""The longest file or folder name, in bytes, of the common file systems (ext4, XFS, Btrfs, APFS, NTFS):
the limit assumed where the output folder's own file system cannot be asked."""


def setting_default(key: str) -> tuple[bool, Any]:
    """``(True, default)`` when the dotted ``key`` is a setting of the recipe's own sections (not a
    component's option) with a default, else ``(False, None)``: what a run saved before the setting
    existed ran with."""
    model: Any = Recipe
    *tables, name = key.split(".")
    for table in tables:
        field = model.model_fields.get(table)
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
            return False, None
    field = model.model_fields.get(name)
    if field is None or field.is_required():
        return False, None
    return True, field.get_default(call_default_factory=True)


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that the file system of ``folder`` (or of its nearest existing
    parent) takes."""
    for existing in [folder, *folder.parents]:
        if existing.is_dir():
            try:
                limit = os.pathconf(existing, "PC_NAME_MAX")
            except (AttributeError, OSError, ValueError):  # Windows has no pathconf; an unreadable folder
                break
            return limit if limit > 0 else NAME_MAX_BYTES
    return NAME_MAX_BYTES


def shortened(text: str, length: int = 40) -> str:
    """``text``, cut to its first ``length`` characters and ``...`` when longer."""
    return text if len(text) <= length else f"{text[:length]}..."


OPTIONAL_TABLES = ("backbone", "density")
"""Component tables a run may leave unused (a network that builds no backbone, a perturbation without
a density estimator); a run's saved recipe holds only the tables it used."""


def read_toml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Parse a TOML file, with its ``base`` chain merged in (the file's own keys win).

    A file that names itself through its ``base`` chain is an error naming the cycle.
    """
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(resolved):], resolved))
        raise SandboxError(f"{path}: base recipes form a cycle: {cycle}")
    where = f" (base of {_chain[-1]})" if _chain else ""
    if path.is_dir():
        raise SandboxError(f"recipe {path}{where} is a directory; expected a TOML file")
    if not path.is_file():
        raise SandboxError(f"recipe {path}{where} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as error:
        raise SandboxError(f"recipe {path}{where} is not UTF-8 text (byte {error.start}); expected a TOML file") from None
    except OSError as error:
        raise SandboxError(f"recipe {path}{where} cannot be read: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise SandboxError(f"{path}: invalid TOML: {error}") from None
    if isinstance(data.get("plugins"), list):
        data["plugins"] = [plugin_beside(path, entry) for entry in data["plugins"]]
    dataset_root_beside(path, data)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise SandboxError(f"{path}: base = {base!r}: expected a path to another recipe")
    inherited = read_toml(path.parent / base, (*_chain, resolved))
    inherited.pop("name", None)  # a run's name is its own file's (or that file's stem), never its base's
    return merge(inherited, data)


def plugin_beside(recipe_path: Path, entry: Any) -> Any:
    """A recipe's ``plugins`` entry as an absolute path when it is a ``.py`` file (relative to the
    recipe's folder, as ``base``); module names are kept as they are."""
    if isinstance(entry, str) and entry.endswith(".py"):
        return str((recipe_path.parent / entry).resolve())
    return entry


def dataset_root_beside(recipe_path: Path, data: dict[str, Any]) -> None:
    """Make a relative ``[dataset] root`` of recipe file ``recipe_path`` (raw ``data``) relative to the
    recipe's folder, as ``base`` and ``plugins`` are: the absolute path of that folder, so the run's saved
    recipe finds it from anywhere. ``--set dataset.root=...`` stays relative to the working directory.

    Compatibility (roots were read relative to the working directory before): a root written relative
    that exists from the working directory but not beside the recipe (``root = "data/VOCdevkit/VOC2012"``
    in ``recipes/``, run from the repository; a run's saved recipe of such a root) is kept as written,
    as is one beside a recipe in the working directory (both readings agree, and runs saved before
    resume as they are). Where both exist and differ, the recipe's folder wins, with a note naming both.
    A root starting with ``~`` is the user's home, as in a shell.
    """
    table = data.get("dataset")
    root = table.get("root") if isinstance(table, dict) else None
    if isinstance(root, str) and root.startswith("~"):  # the user's home, as a shell would read it
        table["root"] = root = str(Path(root).expanduser())
    if not isinstance(root, str) or not root.strip() or Path(root).is_absolute():
        return
    beside, here = (recipe_path.parent / root).resolve(), Path(root).resolve()
    if beside == here or (here.exists() and not beside.exists()):
        return
    if here.exists():
        note_once(f"{recipe_path}: [dataset] root = {root!r} is {beside} (relative to the recipe's folder), not {here}")
    table["root"] = str(beside)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: tables merge key by key, other values are replaced.

    A component table that changes ``name`` starts afresh: the base plugin's options do not
    carry over to a different plugin.
    """
    merged = copy.deepcopy(base)
    for key, value in override.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and value.get("name", old.get("name")) == old.get("name"):
            merged[key] = merge(old, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.iters=50"`` -> ``(["train", "iters"], 50)``; values are TOML, else strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SandboxError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.iters=50")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to raw recipe data (validation happens afterwards).

    An inline table merges into the table it names, as a recipe's tables merge into its ``base``'s
    (``--set 'train={iters=5}'`` is ``--set train.iters=5``; the other ``[train]`` keys stay).
    """
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        table = data
        for part in path[:-1]:
            child = table.setdefault(part, {})
            if not isinstance(child, dict):
                raise SandboxError(f"--set {text!r}: {part!r} is a value, not a table")
            table = child
        if len(path) > 1 and path[-1] == "name" and table.get("name") not in (None, value):
            table.clear()  # a different plugin: the old plugin's options do not apply
        table.update(merge(table, {path[-1]: value}))
    return data


def describe_validation_error(error: pydantic.ValidationError, source: str) -> str:
    """One line naming the first bad key, its value and what was expected."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}"
    if first["type"] == "missing":
        return f"{source}: missing key {key!r}"
    if first["type"] == "value_error" and isinstance(first.get("input"), dict):  # a check across keys
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    return f"{source}: {key} = {first.get('input')!r}: {lower_first(first['msg'].removeprefix('Value error, '))}"


def default_components() -> dict[str, Any]:
    """The default component tables, so that a recipe may set an option without repeating ``name``."""
    defaults = Recipe.model_construct()
    return {
        "model": defaults.model.model_dump(),
        "backbone": defaults.backbone.model_dump(),
        "density": defaults.density.model_dump(),
        "perturbation": defaults.perturbation.model_dump(),
        "consistency": defaults.consistency.model_dump(),
    }


_NOTED: set[str] = set()
"""The notes :func:`note_once` printed."""


def note_once(line: str) -> None:
    """Print ``note: line`` on stderr, once per process (a sweep loads its recipe many times)."""
    if line not in _NOTED:
        _NOTED.add(line)
        print(f"note: {line}", file=sys.stderr)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe (components are checked by :func:`resolve_components`);
    an old option value is renamed, with a note."""
    path = Path(path)
    data = apply_overrides(merge(default_components(), read_toml(path)), overrides or [])
    data.setdefault("name", path.stem)
    for note in rename_old_values(data):
        note_once(f"{path}: {note}")
    try:
        return Recipe.model_validate(data)
    except pydantic.ValidationError as error:
        raise SandboxError(describe_validation_error(error, str(path))) from None


def resolve_components(recipe: Recipe, registry: Registry, source: str = "recipe") -> Recipe:
    """A copy of ``recipe`` whose component tables are checked and hold every default."""
    data = recipe.model_dump(mode="json")
    for table, (kind, spec) in recipe.component_specs().items():
        if spec.name not in registry.names(kind):
            known = ", ".join(registry.names(kind)) or "none"
            raise SandboxError(
                f"{source}: [{table}] name = {spec.name!r}: unknown {kind}; registered: {known}{registry.broken_note()}"
            )
        component = registry.get(kind, spec.name)
        options = component.resolve_options(spec.options(), f"{source}: [{table}]")
        target = data
        *parents, last = table.split(".")
        for part in parents:
            target = target[part]
        target[last] = {"name": spec.name, **options}
    return Recipe.model_validate(data)


def load_resolved_recipe(
    path: Path, overrides: list[str] | None, plugins: list[str] | None
) -> tuple[Recipe, Registry]:
    """The recipe with overrides applied, ``plugins`` extended by ``--plugin``, components resolved; the registry used.

    The resolved recipe (saved as the run's ``recipe.toml``) thus names every plugin the run used.
    """
    from sandbox.plugins import load_registry  # imports the plugins (torch): recipes are read without it

    recipe = load_recipe(path, list(overrides or []))
    recipe.plugins = [*recipe.plugins, *(entry for entry in map(as_recipe_plugin, plugins or []) if entry not in recipe.plugins)]
    registry = load_registry(recipe.plugins)
    return resolve_components(recipe, registry, str(path)), registry


def as_recipe_plugin(spec: str) -> str:
    """A ``--plugin`` as the resolved recipe records it: a ``.py`` file by its absolute path (so the
    saved ``recipe.toml`` loads it from anywhere), a module by its name."""
    return str(Path(spec).resolve()) if spec.endswith(".py") else spec


def recipe_difference(saved_toml: str, recipe: Recipe) -> str:
    """``""`` when ``recipe`` is a run's saved recipe ``saved_toml`` (old option values renamed, the
    tables the run left out ignored, settings added since the run was saved at their defaults), else
    the keys that differ (:func:`differing_keys`)."""
    saved = with_current_names(saved_toml)
    return "" if saved == recipe.as_saved_in(saved) else differing_keys(saved, recipe)


def differing_keys(saved_toml: str, recipe: Recipe) -> str:
    """Comma-separated dotted keys whose values differ between a saved recipe (its option values in
    their current names: see :func:`recipe_difference`) and ``recipe``; ``"formatting"`` when no value
    differs, ``""`` when only settings the saved recipe lacks (added since) do, each at its default in
    ``recipe`` (what the run used before the setting existed)."""
    old, new = flatten_keys(tomllib.loads(saved_toml)), flatten_keys(tomllib.loads(recipe.as_saved_in(saved_toml)))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    significant = [k for k in keys if k in old or not is_default_setting(k, new[k])]
    return ", ".join(significant) or ("" if keys else "formatting")


def is_default_setting(key: str, value: Any) -> bool:
    """Whether the dotted recipe ``key`` is a setting of the recipe's own sections (not a component's
    option) and ``value`` is its default."""
    found, default = setting_default(key)
    return found and default == value
