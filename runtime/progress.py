"""Progress bars for work that takes more than a second (calibration, GPTQ per target, the
budget solver, training). A rich bar on stderr when enabled *and* stderr is a terminal; silent
otherwise (tests, pipes, CI logs), so callers never need to ask.

    progress = Progress.for_terminal(True)
    with progress.task("GPTQ", total=len(targets)) as step:
        for t in targets:
            step(note=t.path)   # one unit done; the note says what is being worked on
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["Progress", "Step"]

Step = Callable[..., None]  # step(n=1, note=None): n units done, optionally naming the current item


def _nothing(n: int = 1, note: str | None = None) -> None:
    pass


class Progress:
    """Where bars go. `Progress()` is silent; `Progress(console)` draws on that rich Console."""

    def __init__(self, console=None):
        self.console = console

    @classmethod
    def for_terminal(cls, enabled: bool) -> "Progress":
        """Bars on stderr when `enabled` and stderr is a terminal; silent otherwise."""
        if not enabled or not sys.stderr.isatty():
            return cls()
        from rich.console import Console

        return cls(Console(stderr=True))

    @property
    def enabled(self) -> bool:
        return self.console is not None

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Step]:
        """A bar for `total` units (a spinner when None); yields `step(n=1, note=None)`."""
        if self.console is None:
            yield _nothing
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bars, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        bars = Bars(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("[dim]{task.fields[note]}"), console=self.console,
                    transient=False)
        with bars:
            task = bars.add_task(description, total=total, note="")

            def step(n: int = 1, note: str | None = None) -> None:
                bars.update(task, advance=n, **({"note": note} if note is not None else {}))
                if note is not None:  # draw now: the bar's own refresh (10/s) would skip quick items
                    bars.refresh()

            yield step
            done = bars.tasks[0].completed if total is not None else 1
            bars.update(task, total=total if total is not None else 1, completed=done, note="done")
