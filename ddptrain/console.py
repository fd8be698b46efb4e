"""Rank-zero terminal output: every line ddptrain prints goes through `console`.

Other ranks stay silent by construction: `console.rank` is set once from the launcher's environment (and
again when the process group is up), and only rank 0's calls reach the terminal. Errors are the exception:
a runtime failure is reported by the rank that failed.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ddptrain.launchenv import launch_env_lenient


class RankZeroConsole:
    def __init__(self) -> None:
        self.rank = launch_env_lenient().rank
        self.quiet = False
        # markup off: user text (column names, paths, labels) is always shown literally, "[m/s]" included
        self.out = Console(highlight=False, soft_wrap=True, markup=False)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_terminal(self) -> bool:
        return self.out.is_terminal

    def print(self, *objects: Any, force: bool = False, **kwargs: Any) -> None:
        """Rank 0 only; `force` prints even under --quiet (final summaries)."""
        if self.is_main and (force or not self.quiet):
            self.out.print(*objects, **kwargs)

    def line(self, text: str, force: bool = False) -> None:
        """Plain text, no markup (safe for user-supplied names)."""
        if self.is_main and (force or not self.quiet):
            self.out.print(text, markup=False)

    def note(self, text: str) -> None:
        """One informational line on stderr (rank 0), e.g. a column dropped, rows left out."""
        if self.is_main:
            self.err.print(f"note: {text}")

    def warn(self, text: str) -> None:
        if self.is_main:
            self.err.print(f"warning: {text}")

    def error(self, text: str, any_rank: bool = False, prefix_rank: bool = False) -> None:
        """One line on stderr. `any_rank`: this rank's own failure, so it reports even if it is not rank 0."""
        if self.is_main or any_rank:
            where = f"[rank {self.rank}] " if prefix_rank else ""
            self.err.print(f"error: {where}{text}")

    def table(self, title: str, rows: list[tuple[str, str]], force: bool = False) -> None:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        self.print(table, force=force)


console = RankZeroConsole()


PLAIN_LINE_EVERY_S = 10.0  # off a terminal: a step line at most this often (a log to read, not a stream)


class EpochProgress:
    """A Rich progress bar per epoch on a terminal; plain periodic lines elsewhere (CI, SLURM logs): the first
    step row, then one every PLAIN_LINE_EVERY_S seconds, and every epoch's summary line."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.enabled = console.is_main and not console.quiet
        self.live = self.enabled and console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None
        self._last_line: float | None = None

    def start_epoch(self, epoch: int, total_steps: int, done_steps: int = 0) -> None:
        if not self.live:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{self.epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} samples/s"), TimeRemainingColumn(),
            console=console.out, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=done_steps,
                                             loss="-", lr="-", speed="-")

    def update(self, row: dict[str, Any], step_in_epoch: int, total_steps: int) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step_in_epoch, loss=_number(row["train_loss"]),
                                  lr=f"{row['lr']:.2e}", speed=f"{row['samples_per_s']:,.0f}")
        elif not self.live and (self._last_line is None
                                or time.monotonic() - self._last_line >= PLAIN_LINE_EVERY_S):
            self._last_line = time.monotonic()
            console.line(f"epoch {row['epoch']}/{self.epochs} step {step_in_epoch}/{total_steps} "
                         f"loss {_number(row['train_loss'])} lr {row['lr']:.2e} {row['samples_per_s']:,.0f} samples/s")

    def end_epoch(self, row: dict[str, Any]) -> None:
        self.close()
        parts = [f"epoch {row['epoch']}/{self.epochs}", f"train_loss {_number(row['train_loss'])}"]
        if row.get("epoch_skipped_steps"):
            parts.append(f"({row['epoch_skipped_steps']} steps skipped)")
        for key in ("val_loss", "val_accuracy", "val_rmse"):
            if key in row:
                parts.append(f"{key} {row[key]:.4f}")
        parts.append(f"{row['samples_per_s']:,.0f} samples/s")
        parts.append(f"{row['epoch_time_s']:.2f}s")
        console.line("  ".join(parts))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class RowProgress:
    """Rows done while a table is read: a Rich bar (rows, rows/s, time left when the total is known) on a terminal;
    a plain line every PLAIN_EVERY_S seconds elsewhere, and one at the end."""

    PLAIN_EVERY_S = 5.0

    def __init__(self, what: str, total: int | None, approximate: bool = False, stderr: bool = False) -> None:
        """`total`: the rows expected, if known; `approximate`: only an estimate (shown as ~N); `stderr`: report
        there (a command whose standard output is its result, such as `eval --json`)."""
        self.what, self.total, self.approximate, self.rows = what, total, approximate, 0
        self.enabled = console.is_main and not console.quiet
        self.stream = console.err if stderr else console.out
        self.started = self.last = time.perf_counter()
        self._progress: Progress | None = None
        if self.enabled and self.stream.is_terminal:
            self._progress = Progress(TextColumn(what), BarColumn(), TextColumn("{task.completed:,} rows"),
                                      TextColumn("{task.fields[speed]} rows/s"), TimeRemainingColumn(),
                                      console=self.stream, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(what, total=total, speed="-")

    def advance(self, rows: int) -> None:
        self.rows += rows
        if not self.enabled:
            return
        now = time.perf_counter()
        speed = self.rows / max(now - self.started, 1e-9)
        if self._progress is not None:
            self._progress.update(self._task, completed=self.rows, speed=f"{speed:,.0f}")
        elif now - self.last >= self.PLAIN_EVERY_S:
            self.last = now
            self.stream.print(self._line(speed), markup=False)

    def _line(self, speed: float) -> str:
        of = f" of {'~' if self.approximate else ''}{self.total:,}" if self.total else ""
        remaining = max(0, self.total - self.rows) if self.total else 0
        left = f", {'~' if self.approximate else ''}{remaining / speed:.0f} s left" if self.total and speed > 0 else ""
        return f"{self.what}: {self.rows:,}{of} rows, {speed:,.0f} rows/s{left}"

    def close(self, summary: bool = True) -> None:
        """Stop the bar; `summary`: say how many rows took how long (not after a failed read)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.enabled and summary:
            seconds = time.perf_counter() - self.started
            self.stream.print(f"{self.what}: {self.rows:,} rows in {seconds:.1f} s", markup=False)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
