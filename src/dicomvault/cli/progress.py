"""Shows progress and per-item problems on stderr: a plugin on the
notification hook, registered by the CLI."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from dicomvault.engine import Context, Event, hookimpl


class ProgressReporter:
    def __init__(self, ctx: Context, *, show_bar: bool) -> None:
        self.ctx = ctx
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.show_bar = show_bar and self.console.is_terminal
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    @hookimpl
    def dicomvault_on_event(self, event: Event) -> None:
        if event.kind == "start" and self.show_bar:
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
                self.console.print(line + (f" ({event.reason})" if event.reason else ""), markup=False)
        elif event.kind == "warning":
            self.console.print(f"warning: {event.reason}", markup=False)
        elif event.kind == "finish" and self.progress is not None:
            self.progress.stop()
            self.progress = None


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
