"""The only place the library writes to the terminal: Rich consoles and progress bars, rank 0 only.

Results go to stdout (``console``); progress, notes and warnings go to stderr (``err_console``)
so that ``unicom models --json > file`` stays clean.
"""

from __future__ import annotations

import os
import time
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


def print_table(table, title: str) -> None:
    """A Rich table under its title, the title on its own line at the terminal's width: as a
    table title it wraps to the table's width, which cuts paths and words."""
    from rich.text import Text

    console.print(Text(title, style="bold"), soft_wrap=True)
    console.print(table)


class Rate:
    """Items per second without the start-up: the first step carries it (worker processes,
    first-call warm-up), so once the later steps hold as many items as the first, the rate is
    theirs over the time since the first step; before that, all items over all the time."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.count = 0
        self.first: tuple[float, int] | None = None  # (time, items) of the first step
        self.last: float | None = None

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.count += n
        if self.first is None:
            self.first = (now, self.count)
        else:
            self.last = now

    def per_second(self) -> float | None:
        if self.first is None:
            return None
        first_time, first_count = self.first
        later = self.count - first_count
        if self.last is not None and later >= first_count and self.last > first_time:
            return later / (self.last - first_time)
        end = self.last or first_time
        return self.count / (end - self.start) if end > self.start else None


def _rate_text(rate: float | None, unit: str) -> str:
    if not rate:
        return f"-- {unit}/s"
    if rate >= 1e6:
        return f"{rate / 1e6:,.1f}M {unit}/s"
    return f"{rate:,.0f} {unit}/s" if rate >= 100 else f"{rate:,.1f} {unit}/s"


class ProgressBar:
    """A counting progress bar; a silent no-op on ranks other than 0 or when disabled."""

    def __init__(self, progress: Progress | None, task_id: int | None, unit: str = "images",
                 width: int = 80) -> None:
        self._progress = progress
        self._task = task_id
        self.unit, self.width = unit, width
        self.rate = Rate()

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items, never past the total (rank 0 extrapolates a multi-process run
        from its own shard, and the last shards can be shorter)."""
        if self._progress is not None:
            task = self._progress.tasks[self._task]
            if task.total is not None:
                n = max(0, min(n, task.total - task.completed))
            self.rate.add(n)
            self._progress.update(self._task, advance=n, rate=_rate_text(self.rate.per_second(), self.unit))

    def update(self, **fields: object) -> None:
        """Change total, completed or description."""
        if self._progress is not None:
            if isinstance(fields.get("completed"), int):
                self.rate.add(fields["completed"] - int(self._progress.tasks[self._task].completed))
                fields["rate"] = _rate_text(self.rate.per_second(), self.unit)
            if isinstance(fields.get("description"), str):
                fields["description"] = _short(str(fields["description"]), _widths(self.width)[0])
            self._progress.update(self._task, **fields)


def _widths(width: int) -> tuple[int, int, bool]:
    """(label, bar, show elapsed) for a terminal ``width``: the counters' widest form (15-digit
    count, 100%, a 16-character rate, eta 0:00:00) stays whole; the label and bar share the rest."""
    elapsed = width >= 100
    rest = width - 53 - (8 if elapsed else 0)
    label = min(40, max(12, rest - 6))
    return label, max(6, min(40, rest - label)), elapsed


def _short(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters: a label's start and end say most."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


@contextmanager
def progress_bar(total: int | None, description: str, unit: str = "images",
                 enabled: bool = True, completed: int = 0) -> Iterator[ProgressBar]:
    """A Rich bar with count, rate and ETA on stderr, e.g. ``with progress_bar(n, "embed") as bar``.

    ``unit="bytes"`` shows transferred/total size and speed in human units (downloads). Fits
    80 columns whole: the label is shortened, the bar narrowed, the elapsed time left out below
    100 columns; the rate leaves out the start-up (``Rate``).
    """
    if not (enabled and _is_main()):
        yield ProgressBar(None, None)
        return
    width = err_console.width
    label, bar, elapsed = _widths(width)
    if unit == "bytes":
        counters = (DownloadColumn(), TransferSpeedColumn())
    else:
        counters = (MofNCompleteColumn(), TaskProgressColumn(), TextColumn("[cyan]{task.fields[rate]}"),
                    *((TimeElapsedColumn(),) if elapsed else ()))
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=bar), *counters,
        TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=False,
        disable=os.environ.get("UNICOM_NO_PROGRESS") == "1",
    )
    with progress:
        task_id = progress.add_task(_short(description, label), total=total,
                                    completed=completed, rate=_rate_text(None, unit))
        yield ProgressBar(progress, task_id, unit, width)
