"""What long work reports, and how it is shown. One rule for every command: a Rich progress bar when
standard output is a terminal and this process is the only worker; otherwise plain log lines, each
with a timestamp (what SLURM logs, CI and `tee` want). Light: Rich is imported only for a bar.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime

from mmpl_cli.errors import printable


def on_terminal() -> bool:
    """The one TTY rule: a bar when standard output is a terminal."""
    return sys.stdout.isatty()


def console_line(console, text: str) -> None:
    """A line on a Rich console: user text, so no markup and control characters escaped."""
    console.print(printable(text, newlines=False), markup=False, highlight=False)


def log_line(text: str) -> None:
    """A plain log line: local time, then the text (control characters escaped: one line, inert)."""
    print(f"{datetime.now():%Y-%m-%d %H:%M:%S} {printable(text, newlines=False)}", flush=True)


class Progress:
    """What a render reports; silent by default (tests and library use)."""

    def task_started(self, task, index: int, total: int) -> None: ...

    def task_reused(self, task, index: int, total: int) -> None: ...

    def step(self, done: int, total: int) -> None: ...

    def task_finished(self, task, seconds: float) -> None: ...

    def message(self, text: str) -> None: ...


class PlainProgress(Progress):
    """A render as log lines: one per finished task, one summing up reused ones."""

    def __init__(self, prefix: str | None = None):
        self.started = time.perf_counter()
        self.prefix = f"{prefix} " if prefix else ""
        self.index = self.total = self.reused = 0

    def task_started(self, task, index, total):
        self.index, self.total = index, total

    def task_reused(self, task, index, total):
        self.reused += 1

    def flush_reused(self):
        if self.reused:
            log_line(f"{self.prefix}reused {self.reused} finished task(s) from the render folder")
            self.reused = 0

    def task_finished(self, task, seconds):
        self.flush_reused()
        elapsed = time.perf_counter() - self.started
        log_line(f"{self.prefix}[{elapsed:7.1f}s] {self.index + 1}/{self.total} {task.id} done in {seconds:.1f}s")

    def message(self, text):
        log_line(f"{self.prefix}{text}")

    def close(self):
        self.flush_reused()


class RichProgress(Progress):
    """A render as two bars: tasks, and the denoising steps of the task running."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       transient=False)
        self.tasks = self.bar.add_task("tasks", total=None)
        self.steps = self.bar.add_task("steps", total=None)
        self.bar.start()

    def task_started(self, task, index, total):
        self.bar.update(self.tasks, total=total, completed=index, description="tasks")
        from rich.markup import escape  # task ids come from the shot list: never markup

        self.bar.update(self.steps, completed=0, total=None, description=escape(f"  {printable(task.id)}"))

    def task_reused(self, task, index, total):
        self.bar.update(self.tasks, total=total, completed=index + 1, description="tasks")

    def step(self, done, total):
        self.bar.update(self.steps, completed=done, total=total)

    def task_finished(self, task, seconds):
        self.bar.advance(self.tasks)

    def message(self, text):
        console_line(self.bar.console, text)

    def close(self):
        self.bar.stop()


class TrainProgress:
    """Training: a bar with loss and speed per stage on a terminal; a log line every 10 steps."""

    def __init__(self, quiet: bool = False):
        self.bar = None
        self.task = self.stage = None
        self.quiet = quiet  # a launcher's other processes: the main one speaks for them
        if on_terminal() and not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[speed]:.2f} step/s"),
                                TimeRemainingColumn(), transient=False)
            self.bar.start()

    def message(self, text: str) -> None:
        if not self.quiet:
            console_line(self.bar.console, text) if self.bar is not None else log_line(text)

    def report(self, stage: str, step: int, steps: int, loss: float, speed: float) -> None:
        if self.quiet:
            return
        if self.bar is None:
            if step % 10 == 0 or step == steps:
                log_line(f"{stage}: step {step}/{steps} loss {loss:.4f} {speed:.2f} step/s")
            return
        if stage != self.stage:
            self.stage = stage
            self.task = self.bar.add_task(stage, total=steps, completed=step - 1, loss=loss, speed=speed)
        self.bar.update(self.task, completed=step, loss=loss, speed=speed)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


def render_progress(prefix: str | None = None) -> PlainProgress | RichProgress:
    """The render's reporter: a bar for a lone process on a terminal; log lines (prefixed with the
    worker's name) for workers, launchers and logs. Call close() when done."""
    return RichProgress() if on_terminal() and not prefix else PlainProgress(prefix)
