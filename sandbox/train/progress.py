"""Progress display: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressReporter:
    """Shows training progress with the live loss and the last mIoU (main process only)."""

    def __init__(self, total: int, start: int, enabled: bool = True, console: Console | None = None) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.console = console or Console(stderr=True)
        self.interactive = enabled and self.console.is_terminal
        self.last_miou: float | None = None
        self.last_loss: float | None = None
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressReporter:
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start, status="")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _status(self) -> str:
        loss = "-" if self.last_loss is None else f"{self.last_loss:.3f}"
        miou = "-" if self.last_miou is None else f"{100 * self.last_miou:.1f}"
        return f"loss {loss}  mIoU {miou}"

    def logged(self, record: dict[str, Any]) -> None:
        """A metrics record was written: update the bar, or print a line."""
        if not self.enabled:
            return
        self.last_loss = record.get("loss")
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], status=self._status())
        else:
            details = "  ".join(
                f"{key} {value:.4g}" for key, value in record.items() if key != "step" and isinstance(value, float)
            )
            self.console.print(f"step {record['step']}/{self.total}  {details}", highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        """Print ``warning: text`` (above the bar on a terminal)."""
        if self.enabled:
            self.console.print(f"warning: {text}", highlight=False, soft_wrap=True, markup=False)

    def evaluated(self, step: int, miou: float) -> None:
        """An evaluation finished."""
        if not self.enabled:
            return
        self.last_miou = miou
        if self._progress is not None:
            self._progress.update(self._task, status=self._status())
        else:
            self.console.print(f"step {step}/{self.total}  val mIoU {100 * miou:.2f}", highlight=False)
