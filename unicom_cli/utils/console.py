"""The only place the library writes to the terminal: Rich consoles and progress bars, rank 0 only.

Results go to stdout (``console``); progress, notes and warnings go to stderr (``err_console``)
so that ``unicom models --json > file`` stays clean.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console()
err_console = Console(stderr=True)


def _is_main() -> bool:
    # Read the environment, not torch: this module must stay importable without torch.
    return os.environ.get("RANK", "0") in ("", "0")


def info(message: str) -> None:
    """A progress note on stderr (rank 0 only)."""
    if _is_main():
        err_console.print(message, highlight=False)


def status(message: str) -> None:
    """A line shown at once, before the seconds spent importing torch and building a network.

    Printed by the process the user started only (rank 0 and not a launched worker).
    """
    if _is_main() and not os.environ.get("UNICOM_LAUNCHER_PID"):
        err_console.print(message, style="dim", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """A warning on stderr (rank 0 only)."""
    if _is_main():
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


def print_context(lines: list[str]) -> None:
    """Context under a result table (sizes, timings, files written), each on its own line at the
    terminal's width: a table caption would wrap to the table's narrow width."""
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


class _RateColumn(TextColumn):
    """Items per second, with the unit of the bar (images/s, steps/s)."""

    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"-- {self.unit}/s", style="cyan")


class ProgressBar:
    """A counting progress bar; a silent no-op on ranks other than 0 or when disabled."""

    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress = progress
        self._task = task_id

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items, never past the total (rank 0 extrapolates a multi-process run
        from its own shard, and the last shards can be shorter)."""
        if self._progress is not None:
            task = self._progress.tasks[self._task]
            if task.total is not None:
                n = max(0, min(n, task.total - task.completed))
            self._progress.advance(self._task, n)

    def update(self, **fields: object) -> None:
        """Change total, completed or description."""
        if self._progress is not None:
            self._progress.update(self._task, **fields)


@contextmanager
def progress_bar(total: int | None, description: str, unit: str = "images",
                 enabled: bool = True, completed: int = 0) -> Iterator[ProgressBar]:
    """A Rich bar with count, rate and ETA on stderr, e.g. ``with progress_bar(n, "embed") as bar``.

    ``unit="bytes"`` shows transferred/total size and speed in human units (downloads).
    """
    if not (enabled and _is_main()):
        yield ProgressBar(None, None)
        return
    if unit == "bytes":
        counters = (DownloadColumn(), TransferSpeedColumn())
    else:
        counters = (MofNCompleteColumn(), TaskProgressColumn(), _RateColumn(unit), TimeElapsedColumn())
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), *counters, TextColumn("eta"),
        TimeRemainingColumn(), console=err_console, transient=False,
        disable=os.environ.get("UNICOM_NO_PROGRESS") == "1",
    )
    with progress:
        task_id = progress.add_task(description, total=total, completed=completed)
        yield ProgressBar(progress, task_id)
