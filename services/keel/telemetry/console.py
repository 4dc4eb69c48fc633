"""What a command prints as it runs (`logging.console`).

The CLI makes one `Console` and hands it down: the controller and the offline trainers report long
operations through `task` (they take anything with that method, `NO_PROGRESS` by default, and never
import rich); the CLI reports each step through `step` and messages through `log`.

  rich    on a terminal: a live display (rich) holding a progress bar per running operation and a
          table of the last steps' metrics; log lines and finished operations print above it.
          When stdout is not a terminal (a CI log, a file) it prints what plain prints.
  plain   the step's one line (the caller decides which steps have one: logging.log_every), and a
          line as each long operation starts (`tokenize prompts ...`) and ends
          (`tokenize prompts: done in 0.4s`).
  none    log lines only: nothing per step or per operation.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO


class Task(Protocol):
    def advance(self, n: int = 1) -> None:
        """`n` more units done."""

    def update(self, done: int) -> None:
        """`done` units done in all."""


class Progress(Protocol):
    def task(self, description: str, total: int | None = None, done: int = 0) -> Any:
        """A context manager around a long operation, yielding its `Task`; `total` units (None: unknown),
        `done` of them already done (a resumed run)."""


class _NoTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, done: int) -> None:
        pass


class _NoProgress:
    """Reports nothing: what the controller and the trainers use unless given a console."""

    @contextmanager
    def task(self, description: str, total: int | None = None, done: int = 0) -> Iterator[Task]:
        yield _NoTask()


NO_PROGRESS = _NoProgress()


class _Counter:
    """A plain-line task: counts units; its lines are printed by Console.task."""

    def __init__(self, total: int | None, done: int):
        self.total, self.done = total, done

    def advance(self, n: int = 1) -> None:
        self.done += n

    def update(self, done: int) -> None:
        self.done = done


def _finished(description: str, total: int | None, done: int, seconds: float) -> str:
    counted = f"{done}/{total} " if total is not None else ""
    return f"{description}: {counted}done in {seconds:.1f}s"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Console:
    """The console of one command (see the module). `stream` is where plain lines go (stdout);
    `rich_console` replaces the rich.console.Console a terminal gets (tests pass one that writes to
    a buffer with force_terminal=True)."""

    def __init__(self, mode: str, stream: TextIO | None = None, rich_console=None, rows: int = 5):
        if mode not in ("rich", "plain", "none"):
            raise ValueError(f"logging.console: rich, plain or none, got {mode!r}")
        self.mode = mode
        self.stream = stream or sys.stdout
        self._live = None
        if mode == "rich" and (rich_console is not None or self.stream.isatty()):
            self._live = _LiveDisplay(rich_console, self.stream, rows)

    @property
    def live(self) -> bool:
        """Whether the rich live display is in use (rich mode on a terminal)."""
        return self._live is not None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def log(self, text: str) -> None:
        """A message, in every mode."""
        if self._live is not None:
            self._live.print(text)
        else:
            self._print(text)

    def step(self, values: dict[str, Any], line: str | None) -> None:
        """A step's metrics: `values` (name -> number or text, e.g. {"step": "3/20", "reward": 0.41})
        make a row of the rich table; `line` is the plain line, None when this step prints none."""
        if self._live is not None:
            self._live.add_row(values)
        elif self.mode != "none" and line is not None:
            self._print(line)

    @contextmanager
    def task(self, description: str, total: int | None = None, done: int = 0) -> Iterator[Task]:
        """A long operation (see `Progress.task`): a progress bar, or a line as it starts and ends."""
        if self._live is not None:
            with self._live.task(description, total, done) as task:
                yield task
            return
        counter = _Counter(total, done)
        if self.mode == "none":
            yield counter
            return
        t0 = time.perf_counter()
        self._print(f"{description} ..." if total is None else f"{description}: {done}/{total} ...")
        yield counter
        self._print(_finished(description, total, counter.done, time.perf_counter() - t0))

    def close(self) -> None:
        """Stop the live display (its last state stays on the screen)."""
        if self._live is not None:
            self._live.stop()


class _LiveDisplay:
    """rich: progress bars of the running operations above a table of the last `rows` steps."""

    def __init__(self, rich_console, stream: TextIO, rows: int):
        from rich.console import Console as RichConsole
        from rich.console import Group
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = rich_console or RichConsole(file=stream)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[counted]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.rows: deque[dict[str, Any]] = deque(maxlen=rows)
        self.live = Live(Group(self.progress, _Table(self.rows)), console=self.console, refresh_per_second=4)
        self.started = False

    def _start(self) -> None:
        if not self.started:
            self.live.start()
            self.started = True

    def print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def add_row(self, values: dict[str, Any]) -> None:
        self._start()
        self.rows.append(values)
        self.live.refresh()

    @contextmanager
    def task(self, description: str, total: int | None, done: int) -> Iterator[Task]:
        self._start()
        task_id = self.progress.add_task(description, total=total, completed=done, counted="")
        bar = _Bar(self.progress, task_id, done, total)
        t0 = time.perf_counter()
        try:
            yield bar
        finally:
            self.progress.remove_task(task_id)
        self.print(_finished(description, total, bar.done, time.perf_counter() - t0))

    def stop(self) -> None:
        if self.started:
            self.live.refresh()
            self.live.stop()
            self.started = False


class _Bar:
    """A rich progress bar's task."""

    def __init__(self, progress, task_id, done: int, total: int | None):
        self.progress, self.task_id, self.total = progress, task_id, total
        self.update(done)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = done
        counted = f"{done}/{self.total}" if self.total is not None else ""  # "step of steps"; nothing when unknown
        self.progress.update(self.task_id, completed=done, counted=counted)


class _Table:
    """The last steps' metrics as a rich table (re-drawn from `rows` at each refresh)."""

    def __init__(self, rows: deque):
        self.rows = rows

    def __rich__(self):
        from rich.table import Table

        if not self.rows:
            return ""
        table = Table(box=None, pad_edge=False, header_style="bold")
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        for name in columns:
            table.add_column(name, justify="right")
        for row in self.rows:
            table.add_row(*(_cell(row.get(name, "")) for name in columns))
        return table
