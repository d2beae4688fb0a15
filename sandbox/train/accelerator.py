"""The Accelerator every command uses: devices and mixed precision from the recipe, trackers, the
learning-rate scaling rule and each process's seed (what processes do together lives in
:mod:`sandbox.processes`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from accelerate import Accelerator

from sandbox.errors import SandboxError
from sandbox.processes.failures import join_restarted_attempt
from sandbox.processes.launch import has_accelerator_device


TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
}
"""The package each of ``train.trackers`` needs (what ``pip install`` takes)."""


def check_trackers(trackers: Sequence[str]) -> None:
    """A one-line :class:`SandboxError` naming each tracker of ``trackers`` whose package is not installed.

    Accelerate itself leaves such a tracker out with a logged warning, and the run trains without it.
    """
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers()}
    missing = [name for name in trackers if name not in available]
    if missing:
        packages = [TRACKER_PACKAGES.get(name, name) for name in missing]
        needs = " and ".join(f"{name!r} {'needs ' if not index else ''}the package {package}"
                             for index, (name, package) in enumerate(zip(missing, packages)))
        which, what = ("is", repr(missing[0])) if len(missing) == 1 else ("are", "them")
        raise SandboxError(
            f"train.trackers: {needs}, which {which} not installed (pip install {' '.join(packages)}, "
            f"or remove {what} from train.trackers)"
        )


def tracker_init_kwargs(trackers: Sequence[str], first_step: int) -> dict[str, dict[str, Any]]:
    """Accelerate's ``init_kwargs`` for ``trackers`` of a run whose next logged step is ``first_step``.

    TensorBoard gets ``purge_step``: its writer records that the run (re)starts there, and
    TensorBoard's reader then discards every event of an earlier writer at or after that step (what a
    resumed run logged past its checkpoint before it was stopped), so each step keeps one value.
    The other trackers have no such mark here: a resumed run's steps after its checkpoint repeat there.
    """
    return {"tensorboard": {"purge_step": first_step}} if "tensorboard" in trackers else {}


def make_accelerator(
    mixed_precision: str, trackers: Sequence[str] = (), project_dir: Path | None = None
) -> Accelerator:
    """An Accelerator for ``mixed_precision``; CPU-only machines get CPU (gloo) processes.

    Without ``cpu=True`` Accelerate treats each process of a CPU launch (``torchrun`` or
    ``accelerate launch --multi_gpu``) as a separate single-process run. ``trackers`` (e.g.
    ``["tensorboard"]``) log under ``project_dir``; one whose package is missing is an error
    (:func:`check_trackers`).
    """
    check_trackers(trackers)
    join_restarted_attempt(cpu=not has_accelerator_device())
    try:
        return Accelerator(
            mixed_precision=mixed_precision,
            cpu=not has_accelerator_device(),
            step_scheduler_with_optimizer=False,
            log_with=list(trackers) or None,
            project_dir=str(project_dir) if project_dir is not None else None,
        )
    except (ValueError, ImportError) as error:
        raise SandboxError(f"train.trackers = {list(trackers)!r}: {error}") from None


def effective_precision(accelerator: Accelerator) -> str:
    """The precision the processes really train in: ``fp16`` needs Accelerate's gradient scaler, which
    it makes on a GPU only (on a CPU fp16 is float32, ``no``)."""
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        return "no"
    return accelerator.mixed_precision


def warn_about_precision(accelerator: Accelerator) -> None:
    """One warning line (main process) when the recipe's mixed precision does not apply on this device."""
    if effective_precision(accelerator) != accelerator.mixed_precision and accelerator.is_main_process:
        print(
            f"warning: train.mixed_precision = {accelerator.mixed_precision!r} needs a GPU; these CPU processes train "
            f"in float32 (bf16 is the CPU's mixed precision); summary.json records mixed_precision = "
            f"{effective_precision(accelerator)!r}",
            file=sys.stderr,
        )


def scaled_lr(lr: float, total_batch: int, reference_total_batch: int | None) -> float:
    """The learning rate for ``total_batch`` labeled images per optimizer step over every process
    (linear scaling rule).

    ``reference_total_batch`` is the total batch that ``lr`` was tuned for; None keeps ``lr``.
    E.g. a recipe tuned on 4 GPUs x 4 images (reference 16) run on 8 GPUs x 4 (total 32) gets ``2 * lr``.
    """
    if reference_total_batch is None:
        return lr
    return lr * total_batch / reference_total_batch


def process_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s own random streams (dropout, noise, VAT's start, CutMix boxes).

    The main process keeps ``seed``; every other process gets a different one derived from
    ``(seed, rank)``, so stochastic parts of the step draw independent noise on each process
    (the reference seeds every rank alike) while a run stays reproducible from its seed.
    """
    return seed if rank == 0 else (seed + 1_000_003 * rank) % 2**63

