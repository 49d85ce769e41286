"""Progress of long work in the terminal: rich progress bars beside the Prefect progress artifacts.

Only when both stdout and stderr are terminals: a run in CI, under pytest, piped to a file or on a Dask
worker shows no bar and writes nothing more than its log. The bars draw on the console of Prefect's log
handler, so log lines print above them instead of through them.
"""
from __future__ import annotations

import atexit
import logging
import sys

from flows import artifacts


def interactive() -> bool:
    """Both stdout and stderr are terminals (a bar on one while the other is piped would leave half a log)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


class Bar:
    """One piece of work on the terminal's shared progress display; without a terminal, nothing at all.

    The display starts with the first bar and stops when every bar on it is finished (finished bars stay
    printed, one line each); a bar finishes at `total` or by finish(), and ignores updates after that.
    Bars live in this process: on a Dask worker (no terminal) there are none."""

    _display = None  # rich.progress.Progress while a bar is unfinished
    _open: set = set()  # the unfinished Bars

    def __init__(self, description: str, total: int):
        self.total, self.task = max(int(total), 1), None
        if not interactive():
            return
        if Bar._display is None:
            Bar._display = _progress_display()
            Bar._display.start()
        self.task = Bar._display.add_task(description, total=self.total)
        Bar._open.add(self)

    def update(self, done: int) -> None:
        if self not in Bar._open:
            return
        Bar._display.update(self.task, completed=min(done, self.total))
        if done >= self.total:
            self.finish()

    def finish(self) -> None:
        """Done, where it stands (work stopped early by a budget or patience keeps its count)."""
        if self not in Bar._open:
            return
        Bar._open.discard(self)
        if not Bar._open:
            _stop()


class Progress(artifacts.Progress):
    """A Prefect progress artifact (flows.artifacts) and, on a terminal, a Bar of the same work."""

    def __init__(self, description: str, total: int, every: float = 5.0):
        super().__init__(description, total, every)
        self.bar = Bar(description, total)

    def update(self, done: int) -> None:
        super().update(done)
        self.bar.update(done)

    def finish(self) -> None:
        super().finish()
        self.bar.finish()


def _progress_display():
    from rich.console import Console
    from rich.default_styles import DEFAULT_STYLES
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.theme import Theme

    consoles = [h.console for h in logging.getLogger().handlers if hasattr(h, "console")]  # Prefect's handler
    console = consoles[0] if consoles and consoles[0].is_terminal else Console(stderr=True)
    # Prefect's theme does not inherit rich's defaults: the bar's own styles, until the display stops
    console.push_theme(Theme({k: v for k, v in DEFAULT_STYLES.items() if k.startswith(("bar.", "progress."))}))
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    refresh_per_second=4)


@atexit.register
def _stop() -> None:
    """Stop the display (also at exit, after a failure left a bar open): the cursor back, stdout restored."""
    if Bar._display is not None:
        Bar._display.stop()
        Bar._display.console.pop_theme()
    Bar._display, Bar._open = None, set()
