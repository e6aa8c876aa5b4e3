"""Shows progress and per-item problems on stderr: a plugin on the
notification hook, registered by the CLI."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from dicomvault.engine import Context, Event, hookimpl

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID


class ProgressReporter:
    def __init__(self, ctx: Context, *, show_bar: bool) -> None:
        self.ctx = ctx
        # rich only for a terminal (or where asked for, as rich itself would be): importing it costs
        # a tenth of a second at a cold start, which scripts and pipes need not pay.
        self.console: Console | None = None
        if wants_rich():
            from rich.console import Console
            # no emoji codes: a file name holding ":smile:" is printed as it is
            self.console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
        self.show_bar = show_bar and self.console is not None and self.console.is_terminal
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def _print(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line, markup=False)
        else:
            print_error(line)

    @hookimpl
    def dicomvault_on_event(self, event: Event) -> None:
        if event.kind == "start" and self.show_bar:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     DownloadColumn(), TimeElapsedColumn(), console=self.console,
                                     transient=True)
            self.progress.start()
            self.task = self.progress.add_task(event.operation, total=event.total)
        elif event.kind == "item":
            if self.progress is not None and self.task is not None and event.what in ("instance", "file"):
                self.progress.update(self.task, advance=1)
            if self.ctx.item_lines and (event.outcome in ("rejected", "conflict", "failed") or event.reason):
                line = f"{event.what} {event.item}: {event.outcome}"
                self._print(line + (f" ({event.reason})" if event.reason else ""))
        elif event.kind == "warning":
            self._print(f"warning: {event.reason}")
        elif event.kind == "finish" and self.progress is not None:
            self.progress.stop()
            self.progress = None


def print_error(line: str) -> None:
    """A line on stderr; none when there is no stderr (``2>&-``). Never on
    stdout, which ``print(file=None)`` would pick: stdout may carry ``--json``."""
    if sys.stderr is not None:
        print(line, file=sys.stderr, flush=True)


def wants_rich() -> bool:
    """Whether rich would see a terminal on stderr: the environment first
    (``TTY_COMPATIBLE``, ``FORCE_COLOR``, read as rich reads them), then
    ``isatty``. No stderr at all (``2>&-``): no."""
    if sys.stderr is None:
        return False
    tty_compatible = os.environ.get("TTY_COMPATIBLE", "")
    if tty_compatible in ("0", "1"):
        return tty_compatible == "1"
    force_color = os.environ.get("FORCE_COLOR")
    if force_color is not None:
        return force_color != ""
    try:
        return sys.stderr.isatty()
    except ValueError:  # closed
        return False
