"""The training loop: Accelerate set-up, data streams, steps, evaluation, checkpoints, resume."""

from __future__ import annotations

import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from sandbox import __version__
from sandbox.api import DensityEstimator
from sandbox.data.errors import DataError, read_batches
from sandbox.data.views import MicroBatchStreamSampler, small_image_note
from sandbox.errors import PluginError, SandboxError, describe_exception, shared_error
from sandbox.plugins import run_provenance
from sandbox.processes.agreement import agreed, agreed_errors, main_process_value
from sandbox.processes.batchnorm import broadcast_buffers, is_synchronised
from sandbox.processes.collectives import host_group, mean_over_processes, prepare_host_group, process_count, process_rank
from sandbox.processes.failures import announced_on_sigterm, beat, collective_free, shared_failures
from sandbox.processes.launch import process_state
from sandbox.recipe import Recipe, flatten_keys
from sandbox.registry import Origin, Registry
from sandbox.rundir.atomic_files import fsync_tree
from sandbox.rundir.directory import (
    CorruptCheckpointError,
    RunDirectory,
    unwritable,
    verify_checkpoint,
)
from sandbox.rundir.files import PROVENANCE_FILE, read_provenance, strict_json
from sandbox.train.accelerator import (
    effective_precision,
    make_accelerator,
    process_seed,
    scaled_lr,
    tracker_init_kwargs,
    warn_about_precision,
)
from sandbox.train.accumulation import batch_plan
from sandbox.train.builder import (
    build_dataset,
    build_method,
    build_model,
    build_partner_view,
    build_train_views,
    check_crop_fits,
    unused_tables,
)
from sandbox.train.determinism import apply_determinism, compute_record, deterministic_error, nondeterministic_operation
from sandbox.train.evaluate import EvalResult, evaluate, val_loader
from sandbox.train.iteration import MicroBatch, TrainingIteration, reads_teacher
from sandbox.train.levers import build_networks
from sandbox.train.log_window import LogWindow, averaged_window, is_log_step, left_out_note
from sandbox.train.progress import ProgressReporter
from sandbox.train.step import LabeledBatch, SemiSupervisedStep, UnlabeledBatch
from sandbox.train.student_pass import network_of

NONFINITE_WARNINGS = 3
"""Steps with a non-finite loss that each get a warning line (then one line says the rest are counted)."""


@dataclass
class TrainingState:
    """Counters that a checkpoint must restore besides the modules."""

    step: int = 0
    best_miou: float = -1.0
    best_step: int = -1
    wall_time: float = 0.0
    best_per_class: dict[str, float | None] = field(default_factory=dict)
    log_sums: dict[str, float] = field(default_factory=dict)
    """This process's sums of the logged values since the last metrics record (a resume continues the
    window on every process: :meth:`state_dict`)."""
    log_steps: int = 0
    log_counts: dict[str, int] = field(default_factory=dict)
    """For each logged value, the applied steps of the current window that produced it (its divisor).

    Values such as ``loss_unsup``, ``loss_perturbed`` or ``density_*`` exist only on some steps
    (after warm-up, once the perturbation starts): each is the mean over the steps that made it."""
    skipped_updates: int = 0
    """Steps whose loss was not finite: no optimizer step, no EMA update (or an AMP overflow)."""
    skipped_density_updates: int = 0
    """Density-estimator updates skipped because the estimator's NLL was not finite."""
    consecutive_nonfinite: int = 0

    def state_dict(self) -> dict[str, Any]:
        """For ``Accelerator.register_for_checkpointing``, which calls it on every process and writes
        the main process's: the fields, and in ``log_windows`` every process's open log window
        (``{"sums", "counts", "steps"}``, in rank order; one gather, called by every process at once as
        ``save_state`` is). ``log_sums``, ``log_counts`` and ``log_steps`` are the main process's, all
        that checkpoints held before ``log_windows``."""
        window = {"sums": self.log_sums, "counts": self.log_counts, "steps": self.log_steps}
        windows: list[Any] = [window]
        if process_count() > 1:
            windows = [None] * process_count()
            torch.distributed.all_gather_object(windows, window, group=host_group())
        return {**asdict(self), "log_windows": windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: each process its own rank's log window. A checkpoint of another
        number of processes, or an older one holding one window, gives every process their
        :func:`~sandbox.train.log_window.averaged_window` (one window: that one), so the resumed
        window's log line stays the mean of each step's value."""
        state = dict(state)
        windows = state.pop("log_windows", None) or [
            {"sums": state.get("log_sums", {}), "counts": state.get("log_counts", {}), "steps": state.get("log_steps", 0)}
        ]
        for key, value in state.items():
            setattr(self, key, value)
        saved = [(window["sums"], window["counts"], window["steps"]) for window in windows]
        own = saved[process_rank()] if len(saved) == process_count() else averaged_window(saved)
        self.log_sums, self.log_counts, self.log_steps = dict(own[0]), dict(own[1]), own[2]


@dataclass
class Evaluation:
    """One evaluation: which model counted (``student`` or ``teacher``), the model, its result."""

    model_name: str
    model: torch.nn.Module
    result: EvalResult


class DensityCheckpoint:
    """Adapts a density estimator's full state (optimizer included) to Accelerate's checkpointing."""

    def __init__(self, estimator: DensityEstimator) -> None:
        self.estimator = estimator

    def state_dict(self) -> dict[str, Any]:
        """The estimator's checkpoint state."""
        return self.estimator.checkpoint_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the estimator's checkpoint state."""
        self.estimator.load_checkpoint_state(state)


def package_versions(registry: Registry) -> dict[str, str]:
    """Versions of Python, the main libraries and every plugin provider."""
    versions = {"python": platform.python_version(), "sandbox": __version__}
    for package in ("torch", "torchvision", "timm", "accelerate", "nflows", "pluggy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    for component in registry:
        versions.setdefault(f"plugin:{component.provider.split()[0]}", component.provider)
    return versions


def start_run(
    recipe: Recipe, registry: Registry, resume: bool, overwrite: bool, on_stop: Callable[[str], None] | None = None
) -> "Trainer":
    """Build the trainer and prepare its run directory (main process); an error on any process ends all.

    What ``sandbox run`` and ``sandbox ablate`` do before :meth:`Trainer.train`. The whole
    construction is one phase of :func:`shared_failures` (``on_stop`` as for :meth:`Trainer.train`):
    a failure on one process between its agreed blocks (moving the teacher to its device,
    ``accelerator.prepare``) ends the peers waiting for it in a collective.
    """
    run_dir = RunDirectory.for_recipe(recipe)
    state = process_state()
    with shared_failures(state.process_index, state.num_processes, on_stop):
        trainer = Trainer(recipe, registry, run_dir)
        with agreed_errors(trainer.accelerator):  # e.g. a run-directory conflict seen by the main process
            if trainer.accelerator.is_main_process:
                run_dir.prepare(recipe, resume=resume, overwrite=overwrite, unused=trainer.unused_tables)
                record_provenance(run_dir, run_provenance(recipe, registry, trainer.unused_tables))
    return trainer


def record_provenance(run_dir: RunDirectory, provenance: dict[str, Any]) -> None:
    """Write ``provenance.json`` (where each component came from) into a run that has none; a resumed
    run keeps the record of its start, with a note for each component that now comes from elsewhere."""
    path = run_dir.path / PROVENANCE_FILE
    recorded = read_provenance(run_dir.path)
    if recorded is None:
        try:
            run_dir.write_file(path, (strict_json(provenance, indent=2) + "\n").encode())
        except OSError as error:  # a full disk
            raise unwritable(run_dir.path, error) from None
        return
    for table, entry in provenance["components"].items():
        before = recorded.get(table)
        if before is not None and before.get("name") == entry["name"] and before != entry:
            then, now = (Origin.from_json(record) for record in (before, entry))
            print(f"note: {entry['kind']} {entry['name']!r} now comes from {now.describe() if now else '?'}; the run "
                  f"started with {then.describe() if then else '?'} ({path} keeps that)", file=sys.stderr)


class Trainer:
    """Trains one recipe into one run directory."""

    def __init__(self, recipe: Recipe, registry: Registry, run_dir: RunDirectory) -> None:
        self.recipe = recipe
        self.registry = registry
        self.run_dir = run_dir
        settings = recipe.train
        if settings.threads:
            torch.set_num_threads(settings.threads)
        apply_determinism(settings.deterministic)
        self.accelerator = make_accelerator(settings.mixed_precision, settings.trackers, run_dir.path)
        warn_about_precision(self.accelerator)
        set_seed(recipe.seed)
        with agreed_errors(self.accelerator):  # a dataset missing on one node ends every process
            self.batches = batch_plan(settings, self.accelerator.num_processes)
            """Micro-batch, processes and accumulation of one optimizer step (``train.total_batch_size``)."""
            self.source = build_dataset(recipe, registry)
            if len(self.source.labeled) == 0:
                raise SandboxError(f"[dataset] {recipe.dataset.name!r} has no labeled images; training needs at least one")
            if len(self.source.val) == 0:
                raise SandboxError(f"[dataset] {recipe.dataset.name!r} has no val images; evaluation needs at least one")
            if settings.warmup_iters < settings.iters and len(self.source.unlabeled) == 0:
                raise SandboxError(
                    f"[dataset] {recipe.dataset.name!r} has no unlabeled images, but train.warmup_iters "
                    f"({settings.warmup_iters}) < train.iters ({settings.iters}) asks for semi-supervised steps"
                )
            tables_used: set[str] = set()
            model = build_model(recipe, registry, self.source.num_classes, tables_used)
            check_crop_fits(recipe, model)
            self.method = build_method(recipe, registry, self.source.num_classes, model.embedding_channels)
            self.unused_tables = unused_tables(tables_used, self.method)
            """The recipe's tables this run does not use: left out of its saved recipe."""
            if settings.perturb_at == "encoder" and not model.has_encoder_maps():
                chosen = ", ".join(f"{key} = {value!r}" for key, value in recipe.model.options().items() if isinstance(value, str))
                raise SandboxError(
                    f"train.perturb_at = 'encoder': [model] {recipe.model.name!r}" + (f" with {chosen}" if chosen else "")
                    + " does not expose its encoder's maps (extract/decode); perturb at the classifier's input"
                )
            if settings.perturb_at == "encoder" and self.method.perturbation.uses_density:
                raise SandboxError(
                    f"[perturbation] {recipe.perturbation.name!r} uses the density of the classifier's embedding: "
                    "it perturbs the classifier's input (train.perturb_at = 'classifier'), not the encoder's maps"
                )
        with collective_free():  # local work, however long: a peer's failure leaves this process time to fail too
            self.lr = scaled_lr(settings.lr, self.batches.total, settings.reference_total_batch)
            """The backbone's learning rate after the linear scaling rule (``train.reference_total_batch``)."""
            networks = build_networks(model, self.accelerator, settings, self.lr)  # sync_bn and the speed levers
            self.teacher = networks.teacher
        self.model, self.optimizer, self.scheduler = networks.prepare(self.accelerator)
        prepare_host_group()  # the density estimator's exchange of pixel counts (a gloo group beside NCCL)
        self.method.perturbation.to(self.accelerator.device)
        self.state = TrainingState()
        self.writing_checkpoint: str | None = None
        """The checkpoint folder being written (``step_N``), else None: for the line a SIGTERM prints."""
        self.accelerator.register_for_checkpointing(self.teacher, self.state)  # the order of CHECKPOINTED_OBJECTS
        if self.method.density is not None:
            self.method.density.to(self.accelerator.device)
            self.accelerator.register_for_checkpointing(DensityCheckpoint(self.method.density))
        rank_seed = process_seed(recipe.seed, self.accelerator.process_index)
        if rank_seed != recipe.seed:  # built identically on every process; from here on, independent noise
            set_seed(rank_seed)
        self.step_fn = SemiSupervisedStep(settings, self.method, self.source.ignore_index, rank_seed)
        self.iteration = TrainingIteration(
            self.accelerator, self.model, self.teacher, self.optimizer, self.scheduler, self.step_fn, settings,
            teacher_read=reads_teacher(recipe),
        )
        if self.accelerator.is_main_process:
            self._warn_if_images_are_small()
            if self.batches.accumulation > 1:
                processes = self.batches.processes
                print(
                    f"note: train.total_batch_size = {self.batches.total} on {processes} process"
                    f"{'es' if processes > 1 else ''}: each step accumulates {self.batches.accumulation} micro-batches "
                    f"of {settings.batch_size} labeled + {settings.unlabeled_batch_size} unlabeled images "
                    "(README \"The same training on fewer GPUs\")",
                    file=sys.stderr,
                )
        batch_partners = settings.cutmix_partners != "stream"
        if settings.unlabeled_batch_size == 1 and settings.cutmix_p > 0 and batch_partners and self.accelerator.is_main_process:
            print(
                f"warning: train.unlabeled_batch_size = 1: CutMix pairs images within a process's batch, so with "
                f"one image it has no partner and is skipped (train.cutmix_p = {settings.cutmix_p} has no effect)",
                file=sys.stderr,
            )

    def _warn_if_images_are_small(self) -> None:
        """A warning when the first labeled image cannot fill a crop (read once; an unreadable
        file is reported where training reads it, with its one-line error)."""
        try:
            image = self.source.labeled[0][0]
        except Exception:  # noqa: BLE001 - the first batch reports it
            return
        train = self.recipe.train
        note = small_image_note(tuple(image.shape[-2:]), train.crop_size, train.scale_range)
        if note is not None:
            print(f"warning: {note}", file=sys.stderr)

    # -- data ------------------------------------------------------------------------------------

    def _stream(self, dataset: Any, size: int, batch_size: int, seed: int, steps_done: int) -> Iterator[Any]:
        """This process's share of an endless batch stream after the ``steps_done`` optimizer steps
        already taken: its micro-batches in order, ``train.total_batch_size``'s accumulation of them a step."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        sampler = MicroBatchStreamSampler(size, seed, steps_done, batch_size, world, rank, self.batches.accumulation)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.recipe.train.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
            persistent_workers=self.recipe.train.num_workers > 0,
            drop_last=True,
            generator=torch.Generator(),  # keeps the loader from drawing on the global RNG
        )
        return read_batches(loader, "training data")

    def _unlabeled_batch(self, tensors: Any) -> UnlabeledBatch:
        """A loader's unlabeled batch on this process's device."""
        return UnlabeledBatch(*tensors).to(self.accelerator.device)

    # -- checkpoints -----------------------------------------------------------------------------

    def _agree_on_models(self) -> None:
        """Every process holds the main process's student buffers (identical already with ``sync_bn``).

        Called before evaluation and checkpointing: every process then evaluates, and the
        checkpoint holds, one model; a resume on N processes continues with what they held. The
        teacher's buffers are averaged then too (:meth:`TrainingIteration.agree_on_teacher`).
        """
        student = self.accelerator.unwrap_model(self.model)
        if not is_synchronised(student):
            broadcast_buffers(student, self.accelerator)
        self.iteration.agree_on_teacher()

    def _staging_folder(self) -> Path:
        """Where every process writes this step's checkpoint before the main process publishes it: in
        the staging folder named by the main process's claim (its name sent to the others)."""
        name = main_process_value(self.accelerator, lambda: self.run_dir.staging_folder().name)
        return self.run_dir.checkpoints / name / f"step_{self.state.step:08d}"

    def _save_checkpoint(self) -> None:
        """Write ``checkpoints/step_N``: every process's files into the claim holder's staging folder,
        flushed, then published by the main process (:meth:`RunDirectory.publish_checkpoint`: its
        ``COMPLETE`` marker, then a ``rename`` checked right before). A holder that lost its claim
        meanwhile stops with the claim's error, its staging folder unpublished."""
        self._agree_on_models()
        staged = self._staging_folder()
        self.writing_checkpoint = staged.name
        if self.accelerator.is_main_process:
            self.run_dir.begin_checkpoint(staged)  # the claim's fence: a holder that lost it stops here
        self.accelerator.wait_for_everyone()
        beat()  # writing, not waiting: a peer's failure leaves this process time to fail by itself
        try:
            self.accelerator.save_state(str(staged))
        except OSError:
            if self.accelerator.is_main_process:
                self.run_dir.check_writable()  # a taker removed the staging folder: say so, not the OSError
            raise
        beat()
        self.accelerator.wait_for_everyone()  # every process's files are written before the marker
        if self.accelerator.is_main_process:
            fsync_tree(staged)  # on disk before the marker that makes the checkpoint count
            beat()
            try:
                self.run_dir.publish_checkpoint(staged, self.state.step)
            except SandboxError:  # the claim was lost meanwhile: what was staged is nobody's
                shutil.rmtree(staged, ignore_errors=True)
                raise
            for old in self.run_dir.complete_checkpoints()[:-self.recipe.train.checkpoints_kept]:
                self.run_dir.check_writable()
                shutil.rmtree(old)
            self.run_dir.remove_incomplete_checkpoints()
        self.accelerator.wait_for_everyone()
        self.writing_checkpoint = None

    def _resume(self) -> None:
        """Load the newest checkpoint that loads on every process; damaged ones are set aside afterwards.

        Every process tries the same candidate, newest first, and the processes exchange the outcome
        (:func:`~sandbox.processes.agreement.agreed`, one agreement per candidate): all loaded it -> resume from it; any found a file that fails to
        decode or is refused as unsafe -> all try the next one; any other error (I/O, memory) -> the
        same line on every process and the checkpoint left alone. Only once they agree, and none
        reads any more, does the main process rename the damaged ones ``corrupt-*`` (one warning
        line each). The main process says which checkpoint the run resumed from.
        """
        if self.accelerator.is_main_process:
            self.run_dir.remove_incomplete_checkpoints()  # a kill during save_state left them
        self.accelerator.wait_for_everyone()
        candidates = self.run_dir.complete_checkpoints()[::-1]
        if not candidates and self.run_dir.summary_file.is_file():  # finished; train.keep_checkpoints_when_done = false
            raise shared_error(
                f"--resume: run {self.run_dir.path} is finished (summary.json) and kept no checkpoint to resume "
                "(train.keep_checkpoints_when_done = false); nothing to do (--overwrite trains it again)"
            )
        if not candidates:  # stopped before its first checkpoint: it starts again, its records too
            if self.accelerator.is_main_process:
                print(f"--resume: {self.run_dir.checkpoints} holds no complete checkpoint; training from step 0",
                      file=sys.stderr)
                self.run_dir.truncate_metrics(0)
            return
        damaged: list[tuple[Path, str]] = []
        chosen = None
        for checkpoint in candidates:
            with agreed(self.accelerator) as loaded:
                loaded.value = self._try_loading(checkpoint)
            outcomes = loaded.values
            failures = [(rank, problem) for rank, (kind, problem) in enumerate(outcomes) if kind == "error"]
            if failures:
                rank, problem = failures[0]
                where = f" on process {rank}" if rank else ""
                raise shared_error(f"--resume: loading {checkpoint} failed{where} ({problem}); the checkpoint is left as it is")
            corrupt = [(rank, problem) for rank, (kind, problem) in enumerate(outcomes) if kind == "corrupt"]
            if not corrupt:
                chosen = checkpoint
                break
            rank, problem = corrupt[0]
            damaged.append((checkpoint, problem + (f" on process {rank}" if rank else "")))
        self.accelerator.wait_for_everyone()  # nobody reads a damaged checkpoint any more
        if self.accelerator.is_main_process:
            for index, (checkpoint, problem) in enumerate(damaged):
                following = candidates[index + 1] if index + 1 < len(candidates) else None
                fallback = f"resuming from {following.name}" if following else "no other checkpoint"
                print(f"warning: checkpoint {checkpoint} could not be loaded ({problem}); {fallback}", file=sys.stderr)
                checkpoint.rename(checkpoint.with_name(f"corrupt-{checkpoint.name}"))
        self.accelerator.wait_for_everyone()
        if chosen is None:
            raise shared_error(
                f"--resume: no checkpoint in {self.run_dir.checkpoints} could be loaded; start again with --overwrite"
            )
        if self.accelerator.is_main_process:
            print(f"resumed from {chosen} (step {self.state.step} of {self.recipe.train.iters})", file=sys.stderr)
            self.run_dir.truncate_metrics(self.state.step)

    def _try_loading(self, checkpoint: Path) -> tuple[str, str]:
        """``("ok", "")``, ``("corrupt", problem)`` (a file fails to decode or is refused as unsafe) or
        ``("error", problem)`` (anything else: I/O, memory, a mismatch) for loading ``checkpoint`` here."""
        try:
            verify_checkpoint(checkpoint)
            self.accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
        except CorruptCheckpointError as error:
            return "corrupt", " ".join(str(error).split())[:300]
        except Exception as error:  # noqa: BLE001 - not the files' content: reported, checkpoint left alone
            return "error", describe_exception(error)[:300]
        return "ok", ""

    # -- non-finite values ------------------------------------------------------------------------

    def _stop_nonfinite(self, window: LogWindow, segment_start: float) -> None:
        """Checkpoint the last good state and stop with a one-line error."""
        self.state.wall_time += time.perf_counter() - segment_start
        self.state.skipped_density_updates += self.step_fn.take_skipped_density_updates()
        self.state.log_sums, self.state.log_counts, self.state.log_steps = window.saved()
        self._save_checkpoint()
        count = self.state.consecutive_nonfinite
        raise SandboxError(
            f"training stopped at step {self.state.step}: {count} consecutive non-finite losses "
            f"(train.max_consecutive_nonfinite = {self.recipe.train.max_consecutive_nonfinite}); the last good state is "
            f"checkpointed in {self.run_dir.checkpoints / f'step_{self.state.step:08d}'}"
        )

    def _warn_nonfinite(self, reporter: ProgressReporter, logs: dict[str, torch.Tensor], warned: int) -> int:
        """Say that step ``state.step`` skipped its update and why (the first few times); the new count."""
        if warned < NONFINITE_WARNINGS:
            limit = self.recipe.train.max_consecutive_nonfinite
            reporter.warn(
                f"step {self.state.step}: update skipped, {self.step_fn.nonfinite_sources(logs)}; "
                f"{limit} in a row stop the run (train.max_consecutive_nonfinite)"
            )
        elif warned == NONFINITE_WARNINGS:
            reporter.warn("further skipped updates are counted in metrics.jsonl and summary.json (skipped_updates)")
        return warned + 1

    # -- evaluation ------------------------------------------------------------------------------

    def _eval_models(self) -> dict[str, torch.nn.Module]:
        """The models ``eval.model`` asks for by name; the student alone until the teacher exists."""
        student = network_of(self.accelerator.unwrap_model(self.model))
        choice = self.recipe.eval.model
        if self.state.step <= self.recipe.train.warmup_iters or choice == "student":
            return {"student": student}
        if choice == "teacher":
            return {"teacher": self.teacher}
        return {"student": student, "teacher": self.teacher}

    def _evaluate(self, reporter: ProgressReporter, log: bool = True) -> Evaluation:
        """Evaluate, keep the best weights; ``log=False`` writes no metrics record (already written).

        With ``eval.model = "both"`` the student and the teacher are evaluated and the better one
        counts (the reference's ``max(prec_s, prec_t)``); both mIoUs are logged.
        """
        self._agree_on_models()
        models = self._eval_models()
        loader = val_loader(self.source, self.recipe.eval, self.accelerator)
        results = {
            name: evaluate(model, loader, self.source.class_names, self.accelerator, self.recipe.eval, self.source.ignore_index)
            for name, model in models.items()
        }
        name = max(results, key=lambda key: results[key].miou)  # the same on every process: matrices are reduced
        evaluation = Evaluation(name, models[name], results[name])
        result = evaluation.result
        improved = result.miou > self.state.best_miou
        if improved:
            self.state.best_miou, self.state.best_step = result.miou, self.state.step
            self.state.best_per_class = result.per_class
        scores = {f"val_miou_{key}": value.miou for key, value in results.items()} if len(results) > 1 else {}
        if self.accelerator.is_main_process and log:
            record = {"step": self.state.step, "val_miou": result.miou, **scores, "val_model": name}
            self.run_dir.append_metrics({**record, "val_per_class_iou": result.per_class})
            if improved:
                self._save_weights(evaluation.model, self.run_dir.best_weights, result.miou)
        if log:  # as metrics.jsonl: a finished run's evaluation again after --resume was logged already
            scalars = {f"val_iou/{key}": iou for key, iou in result.per_class.items() if iou is not None}
            self.accelerator.log({"val_miou": result.miou, **scores, **scalars}, step=self.state.step)
        reporter.evaluated(self.state.step, result.miou)
        return evaluation

    def _save_weights(self, model: torch.nn.Module, path: Any, miou: float) -> None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self.run_dir.save_torch({"model": state, "step": self.state.step, "miou": miou, "recipe": self.recipe.to_toml(omit=self.unused_tables)}, path)

    # -- the loop --------------------------------------------------------------------------------

    def train(self, resume: bool = False, on_stop: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Train to ``train.iters``, evaluating and checkpointing on schedule; return the summary.

        Any error (a plugin raising, a full disk) becomes a one-line :class:`SandboxError`, and on
        several processes every process ends with that same line (:func:`shared_failures`);
        ``on_stop(message)`` runs on a process that a peer's failure ends. Before a process reports
        a failure or ends, its trackers are flushed and (main process) interrupted writes' temporary
        files removed.
        """

        def cleanup() -> None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            if self.accelerator.is_main_process:
                self.run_dir.remove_temporaries()

        with shared_failures(self.accelerator.process_index, self.accelerator.num_processes, on_stop, cleanup), \
                announced_on_sigterm(self._stop_note):
            try:
                return self._train(resume)
            except KeyboardInterrupt:  # Ctrl-C: the line SIGTERM prints, then stop as Ctrl-C does
                line = self._stop_note("Ctrl-C")
                if line:
                    print(line, file=sys.stderr, flush=True)
                raise
            except SandboxError as error:
                if not isinstance(error, (PluginError, DataError)):  # a recipe's error needs no step
                    raise
                raise SandboxError(f"training failed after {self._steps_done()}: {error}") from error
            except Exception as error:
                raise SandboxError(f"training failed after {self._steps_done()}: {describe_exception(error)}") from error

    def _steps_done(self) -> str:
        return f"{self.state.step} of {self.recipe.train.iters} steps"

    def _stop_note(self, cause: str = "SIGTERM") -> str | None:
        """The line a SIGTERM (or Ctrl-C, ``cause``) prints (main process): where the run stopped, which
        checkpoint a resume continues from and the command that does it."""
        if not self.accelerator.is_main_process:
            return None
        writing = self.writing_checkpoint
        during = f" while writing checkpoint {writing} (not complete)" if writing else ""
        complete = self.run_dir.complete_checkpoints()
        start = (f"--resume continues from {complete[-1].name}" if complete
                 else "no checkpoint is complete: --resume starts at step 0")
        launcher = " (under the same accelerate launch options)" if self.accelerator.num_processes > 1 else ""
        return (f"stopped by {cause} at step {self.state.step} of {self.recipe.train.iters}{during}; {start}: "
                f"sandbox run {self.run_dir.recipe_file} --resume{launcher} "
                "(a sweep's run: rerun its sandbox ablate command)")

    def _train(self, resume: bool) -> dict[str, Any]:
        settings = self.recipe.train
        if resume:
            self._resume()
        if settings.trackers:
            config = flatten_keys(self.recipe.model_dump(mode="json"))
            config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
            self.accelerator.init_trackers(  # a resumed run's first logged step is past its checkpoint's
                self.recipe.name, config=config, init_kwargs=tracker_init_kwargs(settings.trackers, self.state.step + 1)
            )
        source = self.source
        labeled_view, unlabeled_view = build_train_views(source, self.recipe)
        labeled = self._stream(labeled_view, len(source.labeled), settings.batch_size, self.recipe.seed, self.state.step)
        unlabeled = self._stream(
            unlabeled_view, len(source.unlabeled), settings.unlabeled_batch_size, self.recipe.seed + 1,
            max(self.state.step - settings.warmup_iters, 0),
        )
        partners = None
        if settings.cutmix_partners == "stream":
            partners = self._stream(
                build_partner_view(source, self.recipe), len(source.unlabeled), settings.unlabeled_batch_size,
                self.recipe.seed + 2, max(self.state.step - settings.warmup_iters, 0),
            )
        reporter = ProgressReporter(settings.iters, self.state.step, enabled=self.accelerator.is_main_process)
        self.model.train()
        self.teacher.train(settings.teacher_mode == "train")  # the reference predicts in train mode
        window = LogWindow(self.state.log_sums, self.state.log_counts, self.state.log_steps)
        window_start = time.perf_counter()
        segment_start = time.perf_counter()
        result: Evaluation | None = None
        warned = 0
        noted: set[str] = set()  # the logged values whose non-finite value a warning named (once each)
        with reporter:
            while self.state.step < settings.iters:
                beat()  # the main thread moves on: a peer's failure leaves it time to fail by itself
                step = self.state.step
                micro_batches = []
                for _ in range(self.batches.accumulation):
                    batch = MicroBatch(LabeledBatch(*next(labeled)).to(self.accelerator.device))
                    if step >= settings.warmup_iters:
                        batch.unlabeled = self._unlabeled_batch(next(unlabeled))
                        batch.partners = self._unlabeled_batch(next(partners)) if partners is not None else None
                    micro_batches.append(batch)
                try:
                    outcome = self.iteration.accumulate(step, micro_batches)
                except RuntimeError as error:  # the network's own operations (a backward pass) under train.deterministic
                    op = nondeterministic_operation(error)
                    if op is None:
                        raise
                    raise deterministic_error(op) from error
                logs, finite, stepped = outcome.logs, outcome.finite, outcome.stepped
                self.state.step += 1
                window.steps += 1
                if stepped:
                    self.state.consecutive_nonfinite = 0
                    window.add(logs)
                else:
                    self.state.skipped_updates += 1
                    self.state.consecutive_nonfinite += 0 if finite else 1
                    if not finite:
                        warned = self._warn_nonfinite(reporter, logs, warned)
                if is_log_step(step, settings):  # state.step == step + 1 finished iterations
                    elapsed = time.perf_counter() - window_start
                    self.state.skipped_density_updates += self.step_fn.take_skipped_density_updates()
                    local = window.means()
                    note = left_out_note(window.keys, local, self.state.step, noted)
                    if note is not None:
                        reporter.warn(note)
                    means = mean_over_processes(local)
                    record = {"step": self.state.step, **means}
                    record["lr"] = self.scheduler.get_last_lr()[0]
                    record["skipped_updates"] = self.state.skipped_updates
                    if self.method.density is not None:
                        record["skipped_density_updates"] = self.state.skipped_density_updates
                    record["images_per_s"] = window.steps * (settings.batch_size + (
                        settings.unlabeled_batch_size if step >= settings.warmup_iters else 0)) * (
                        self.accelerator.num_processes * self.batches.accumulation) / elapsed
                    if self.accelerator.is_main_process:
                        self.run_dir.append_metrics(record)
                    self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.state.step)
                    reporter.logged(record)
                    window, window_start = LogWindow(), time.perf_counter()
                if self.state.consecutive_nonfinite >= settings.max_consecutive_nonfinite:
                    self._stop_nonfinite(window, segment_start)
                if self.state.step % settings.eval_every == 0 or self.state.step == settings.iters:
                    result = self._evaluate(reporter)
                if self.state.step % settings.checkpoint_every == 0 or self.state.step == settings.iters:
                    self.state.wall_time += time.perf_counter() - segment_start
                    self.state.skipped_density_updates += self.step_fn.take_skipped_density_updates()
                    self.state.log_sums, self.state.log_counts, self.state.log_steps = window.saved()
                    segment_start = time.perf_counter()
                    self._save_checkpoint()
        if result is None:  # resumed a finished run: evaluate the final model again (logged already)
            result = self._evaluate(reporter, log=False)
        return self._finish(result)

    def _finish(self, evaluation: Evaluation) -> dict[str, Any]:
        result = evaluation.result
        summary = {
            "recipe": self.recipe.name,
            "seed": self.recipe.seed,
            "iters": self.state.step,
            "final_miou": result.miou if math.isfinite(result.miou) else None,
            "final_per_class_iou": result.per_class,
            "final_model": evaluation.model_name,
            "best_miou": self.state.best_miou if self.state.best_step >= 0 else None,  # None: never scored
            "best_step": self.state.best_step if self.state.best_step >= 0 else None,
            "best_per_class_iou": self.state.best_per_class,
            "wall_time_s": self.state.wall_time,
            "skipped_updates": self.state.skipped_updates,
            "skipped_density_updates": self.state.skipped_density_updates,
            **self.batches.record(),
            "lr": self.lr,
            "mixed_precision": effective_precision(self.accelerator),
            "compute": compute_record(self.accelerator.device, self.recipe.train.deterministic),
            "versions": package_versions(self.registry),
            "run_dir": str(self.run_dir.path),
        }
        if self.accelerator.is_main_process:
            self._save_weights(evaluation.model, self.run_dir.last_weights, result.miou)
            self.run_dir.write_summary(summary)
            if not self.recipe.train.keep_checkpoints_when_done and self.run_dir.checkpoints.is_dir():
                self.run_dir.check_writable()  # finished: best.pt, last.pt and the records stay
                shutil.rmtree(self.run_dir.checkpoints)
        self.accelerator.wait_for_everyone()
        for tracker in self.accelerator.trackers:  # not end_training(): it destroys the process group,
            tracker.finish()  # which later collectives (another ablation run, an evaluation) still need
        return summary
