"""The run directory: resolved recipe, metrics.jsonl, summary.json, weights and checkpoints.

One writer: the process holding the run's claim (:mod:`sandbox.rundir.claims`). Its fence
(:func:`guarded_writes`) is called before each write and again right before the write is published:
a file's content goes to the writer's own temporary file (a checkpoint's to a staging folder named
by the claim's token, ``checkpoints/.staging.<token>/step_N``), and only a ``rename`` checked just
before puts it in place; a line of ``metrics.jsonl`` is appended by one ``write`` checked just before.
A holder paused for longer than its claim's timeout (and taken over meanwhile) loses its own write,
never overwrites one of the taker's.

Importing this module imports no torch (``sandbox ablate --list`` reads run directories): the
functions that need it (:meth:`RunDirectory.save_torch`, checkpoint verification) import it when called.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Collection, Iterator, Protocol

from sandbox.errors import SandboxError
from sandbox.rundir.atomic_files import fsync_directory, remove_temporaries, write_atomically
from sandbox.rundir.files import strict_json
from sandbox.rundir.files import METRICS_FILE, RECIPE_FILE, SUMMARY_FILE, is_claim_file

if TYPE_CHECKING:
    from sandbox.recipe import Recipe


COMPLETE_MARKER = "COMPLETE"
"""Written last (atomically) into a checkpoint folder: only folders holding it count."""

CHECKPOINTED_OBJECTS = ("teacher", "training state", "density")
"""What :class:`~sandbox.train.loop.Trainer` registers for checkpointing besides the prepared student,
in this order (the density estimator only where the run has one); Accelerate saves the i-th as
``custom_checkpoint_{i}.pkl`` in each checkpoint folder (see :func:`checkpointed_file`)."""


def checkpointed_file(folder: Path, name: str) -> Path:
    """The file of the checkpointed object ``name`` (one of :data:`CHECKPOINTED_OBJECTS`) in a checkpoint folder."""
    return folder / f"custom_checkpoint_{CHECKPOINTED_OBJECTS.index(name)}.pkl"


class CorruptCheckpointError(Exception):
    """A checkpoint file failed to decode (truncated, garbled) or holds objects that are refused as unsafe."""


def _is_decoding_failure(error: BaseException) -> bool:
    """Whether reading a file failed because of its content, not the machine (I/O, memory).

    Truncated or garbled pickles raise ``UnpicklingError``/``EOFError``/``ValueError``; a file
    holding other objects than plain data is refused with ``UnpicklingError``; a damaged zip
    archive (torch's format) raises a ``RuntimeError`` from its ``PytorchStreamReader``.
    ``OSError`` and ``MemoryError`` (or a RuntimeError about allocating memory) are not about the
    file and never count.
    """
    import pickle

    import torch
    from safetensors import SafetensorError

    if isinstance(error, (pickle.UnpicklingError, EOFError, SafetensorError)):
        return True
    if isinstance(error, RuntimeError) and not isinstance(error, torch.OutOfMemoryError):
        return "PytorchStreamReader" in str(error) or "zip archive" in str(error)
    return isinstance(error, ValueError)


def verify_checkpoint(folder: Path) -> None:
    """Read every file of a checkpoint folder as plain data; raise if one is damaged or unsafe.

    Accelerate's ``load_state`` reads the optimizer, scheduler and RNG files with
    ``weights_only=True`` but unpickles the registered objects (``custom_checkpoint_*.pkl``) with
    ``weights_only=False``. Reading each file first with ``weights_only=True`` (tensors, containers
    and primitives only; numpy's RNG state as Accelerate allows) makes a file that holds any other
    object, or a truncated one, fail here before anything is loaded: that failure is a
    :class:`CorruptCheckpointError`; any other error (I/O, memory) propagates as it is.
    """
    from accelerate.utils.other import load as accelerate_load
    from safetensors import safe_open

    for path in sorted(folder.iterdir()):
        if path.name == COMPLETE_MARKER or path.is_dir():
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        handle.get_tensor(key)
            elif path.suffix in (".bin", ".pkl", ".pt"):
                accelerate_load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            if _is_decoding_failure(error):
                raise CorruptCheckpointError(f"{path.name}: {type(error).__name__}: {error}") from error
            raise


class WriteFence(Protocol):
    """What a run's one writer is fenced by: its claim (:class:`sandbox.rundir.claims.ClaimKeeper`)."""

    token: str
    """Names the writer's staging folders."""

    def check(self) -> None:
        """Raise (a ``SandboxError``) when the writer may no longer write into the run."""


_FENCES: dict[str, WriteFence] = {}
"""The fences of the run directories (by absolute path) that this process holds a claim on."""
_UNCLAIMED_TOKEN = uuid.uuid4().hex
"""Names this process's staging folders in a run directory it holds no claim on."""
STAGING_PREFIX = ".staging."
"""``checkpoints/.staging.<token>``: where the writer holding ``<token>`` writes a checkpoint before publishing it."""


@contextmanager
def guarded_writes(path: Path, fence: WriteFence | None) -> Iterator[None]:
    """While active, every :class:`RunDirectory` of ``path`` in this process calls ``fence.check`` before
    each write and before publishing it (the claim holder's fence, :meth:`sandbox.rundir.claims.ClaimKeeper.check`),
    and names its staging folders by ``fence.token``; None: no fence."""
    if fence is None:
        yield
        return
    key = os.path.abspath(path)
    _FENCES[key] = fence
    try:
        yield
    finally:
        if _FENCES.get(key) is fence:
            del _FENCES[key]


class RunDirectory:
    """``<output_dir>/<name>/seed<seed>/`` and the files a run writes there."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def check_writable(self) -> None:
        """Call the fence :func:`guarded_writes` set for this path, if any: the claim holder's check before
        a write and before publishing it."""
        fence = _FENCES.get(os.path.abspath(self.path))
        if fence is not None:
            fence.check()

    def writer_token(self) -> str:
        """The token of this process's claim on the run (a random one of this process's when it holds none)."""
        fence = _FENCES.get(os.path.abspath(self.path))
        return fence.token if fence is not None else _UNCLAIMED_TOKEN

    def write_file(self, path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
        """Write ``path`` in the run directory whole (:func:`~sandbox.rundir.atomic_files.write_atomically`),
        fenced: checked before the content is written and again right before the rename publishes it."""
        self.check_writable()
        write_atomically(path, data, before_publish=self.check_writable)

    def save_torch(self, obj: Any, path: Path) -> None:
        """``torch.save`` of ``obj`` to ``path`` in the run directory, as :meth:`write_file` writes."""
        import torch

        self.write_file(path, lambda handle: torch.save(obj, handle))

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> RunDirectory:
        """The run directory a recipe trains into."""
        return cls(Path(recipe.output_dir) / recipe.name / f"seed{recipe.seed}")

    recipe_file = property(lambda self: self.path / RECIPE_FILE)
    metrics_file = property(lambda self: self.path / METRICS_FILE)
    summary_file = property(lambda self: self.path / SUMMARY_FILE)
    checkpoints = property(lambda self: self.path / "checkpoints")
    best_weights = property(lambda self: self.path / "best.pt")
    last_weights = property(lambda self: self.path / "last.pt")

    def prepare(self, recipe: Recipe, resume: bool, overwrite: bool, unused: Collection[str] = ()) -> None:
        """Create (or check, when resuming) the directory and write the resolved recipe, without the
        tables in ``unused`` (see :data:`~sandbox.recipe.OPTIONAL_TABLES`)."""
        if resume:
            if not self.recipe_file.is_file():
                raise SandboxError(f"--resume: {self.path} holds no run to resume; run without --resume")
            difference = recipe.difference_from_saved(self.recipe_file.read_text())
            if difference:
                raise SandboxError(
                    f"--resume: the recipe differs from {self.recipe_file} in {difference}; "
                    f"resume with that file or start a new run (--set name=... or --overwrite)"
                )
            return
        content = [entry for entry in self.path.iterdir() if not is_claim_file(entry.name)] if self.path.is_dir() else []
        if content:
            if not overwrite:
                raise SandboxError(
                    f"run directory {self.path} already exists; use --resume to continue it, --overwrite to "
                    f"replace it, or --set name=... for a new run"
                )
            if not self.recipe_file.is_file():
                raise SandboxError(
                    f"--overwrite: {self.path} holds files but no run (no {RECIPE_FILE}); --overwrite replaces only a "
                    "run: choose another name (--set name=...) or output_dir, or empty that folder yourself; nothing was deleted"
                )
            self.check_writable()
            remove_all(content)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.write_file(self.recipe_file, recipe.to_toml(omit=unused).encode())
        except OSError as error:  # a read-only place, an output_dir that is a file, a full disk
            raise unwritable(self.path, error) from None

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON object to ``metrics.jsonl``: one ``write`` of the whole line, checked right before
        (the file's first line is written as :meth:`write_file` writes). Strict JSON: a non-finite value
        is written as ``null`` (:func:`~sandbox.rundir.files.strict_json`)."""
        line = (strict_json(record) + "\n").encode()
        self.check_writable()
        try:
            descriptor = os.open(self.metrics_file, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            write_atomically(self.metrics_file, line, before_publish=self.check_writable)
            return
        try:
            self.check_writable()
            os.write(descriptor, line)
        finally:
            os.close(descriptor)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric records past ``after_step`` (written after the checkpoint a resume starts from)."""
        if not self.metrics_file.is_file():
            return
        kept = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if isinstance(record, dict) and record.get("step", 0) <= after_step:
                kept.append(line)
        self.write_file(self.metrics_file, "".join(line + "\n" for line in kept).encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` (strict JSON: a non-finite value is written as ``null``)."""
        self.write_file(self.summary_file, (strict_json(summary, indent=2) + "\n").encode())

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint folders whose writing finished (they hold ``COMPLETE``), oldest first."""
        return sorted(p for p in self.checkpoints.glob("step_*") if (p / COMPLETE_MARKER).is_file())

    def remove_incomplete_checkpoints(self) -> None:
        """Delete checkpoint folders without ``COMPLETE`` (a kill during saving, before staging existed),
        every other writer's staging folder (a holder that died, or was taken over, while saving) and the
        temporary files of interrupted writes (run directory and checkpoint folders)."""
        self.check_writable()
        for folder in self.checkpoints.glob("step_*"):
            if folder.is_dir() and not (folder / COMPLETE_MARKER).is_file():
                shutil.rmtree(folder, ignore_errors=True)
        mine = self.staging_folder()
        for folder in self.checkpoints.glob(f"{STAGING_PREFIX}*"):
            if folder != mine:
                shutil.rmtree(folder, ignore_errors=True)
        self.remove_temporaries()

    def staging_folder(self, token: str | None = None) -> Path:
        """``checkpoints/.staging.<token>``: the folder only the writer holding ``token`` (this process's
        :meth:`writer_token` when None) writes checkpoints into before publishing them."""
        return self.checkpoints / f"{STAGING_PREFIX}{token or self.writer_token()}"

    def begin_checkpoint(self, staged: Path) -> None:
        """Before every process writes a checkpoint into ``staged`` (in :meth:`staging_folder`): the fence,
        and a leftover of an earlier attempt there removed (never two states mixed)."""
        self.check_writable()
        if staged.exists():
            shutil.rmtree(staged)

    def publish_checkpoint(self, staged: Path, step: int) -> Path:
        """Make the checkpoint written (and flushed) in ``staged`` count: its ``COMPLETE`` marker, then,
        checked right before, a ``rename`` to ``checkpoints/step_N`` (an earlier folder of that name, a
        leftover of an attempt at this step, is removed first). Returns the published folder."""
        folder = self.checkpoints / f"step_{step:08d}"
        write_atomically(staged / COMPLETE_MARKER, str(step).encode())
        self.check_writable()
        if folder.exists():
            shutil.rmtree(folder)
            self.check_writable()
        os.rename(staged, folder)
        fsync_directory(self.checkpoints)
        if staged.parent != self.checkpoints and not any(staged.parent.iterdir()):
            staged.parent.rmdir()
        return folder

    def remove_temporaries(self) -> None:
        """Delete the temporary files interrupted writes left (``.<name>.tmp.*``); the main process only."""
        if self.path.is_dir():
            remove_temporaries(self.path, keep=is_claim_file)  # a claim's are its holder's or a rival's
        for folder in self.checkpoints.glob("step_*"):
            remove_temporaries(folder)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None


def unwritable(path: Path, error: OSError) -> SandboxError:
    """The one-line error for a run directory ``path`` that cannot be written (read-only, a file, a full disk)."""
    culprit = f" ({error.filename})" if error.filename else ""
    return SandboxError(
        f"run directory {path} cannot be written: {error.strerror or error}{culprit}; "
        "check output_dir (recipe or --set output_dir=...)"
    )


def remove_all(content: list[Path]) -> None:
    """Delete these files and folders of a run directory (``--overwrite`` keeps only a claim: the
    ``sandbox ablate`` process about to train there holds it; see :mod:`sandbox.rundir.claims`)."""
    for entry in content:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
