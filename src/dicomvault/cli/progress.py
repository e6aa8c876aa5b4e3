"""Shows progress and per-item problems on stderr: a plugin on the
notification hook, registered by the CLI."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from dicomvault.engine import Context, Event, hookimpl

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID


class ProgressReporter:
    def __init__(self, ctx: Context, *, show_bar: bool) -> None:
        self.ctx = ctx
        # rich only for a terminal: importing it costs a tenth of a second at a cold start,
        # which scripts and pipes (plain lines either way) need not pay.
        self.console: Console | None = None
        if stderr_is_terminal():
            from rich.console import Console
            self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.show_bar = show_bar and self.console is not None and self.console.is_terminal
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def _print(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line, markup=False)
        else:
            print(line, file=sys.stderr, flush=True)

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


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
