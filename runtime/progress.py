"""Progress bars for work that takes more than a second (calibration, GPTQ per target, the
budget solver, training). A rich bar on stderr when enabled and stderr is a terminal; when enabled
and stderr is a pipe or a log file (CI, `| tee`), one plain line as each task starts and one as it
ends, with its count and seconds (a compile printed nothing for 18 minutes there and looked hung);
silent when not enabled (the Python API's default), so callers never need to ask.

    progress = Progress.for_terminal(True)
    with progress.task("GPTQ", total=len(targets)) as step:
        for t in targets:
            step(note=t.path)   # one unit done; the note says what is being worked on
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["Progress", "Step"]

Step = Callable[..., None]  # step(n=1, note=None): n units done, optionally naming the current item


def _nothing(n: int = 1, note: str | None = None) -> None:
    pass


class Progress:
    """Where bars go. `Progress()` is silent; `Progress(console)` draws on that rich Console."""

    def __init__(self, console=None, *, lines=None):
        self.console = console
        self.lines = lines  # a text stream for plain start/end lines, where no bars can be drawn

    @classmethod
    def for_terminal(cls, enabled: bool) -> "Progress":
        """Bars on stderr when `enabled` and stderr is a terminal, plain lines when it is not;
        silent when not `enabled`."""
        if not enabled:
            return cls()
        if not sys.stderr.isatty():
            return cls(lines=sys.stderr)
        from rich.console import Console

        return cls(Console(stderr=True))

    @property
    def enabled(self) -> bool:
        return self.console is not None or self.lines is not None

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Step]:
        """A bar for `total` units (a spinner when None); yields `step(n=1, note=None)`."""
        if self.console is None:
            if self.lines is None:
                yield _nothing
            else:
                with self._plain(description, total) as step:
                    yield step
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

    @contextmanager
    def _plain(self, description: str, total: int | None) -> Iterator[Step]:
        """"description …" now and "description: N/total done in S s" at the end, flushed."""
        done, start = [0], time.perf_counter()

        def step(n: int = 1, note: str | None = None) -> None:
            done[0] += n

        print(f"{description} …", file=self.lines, flush=True)
        yield step
        count = f"{done[0]}/{total} " if total is not None else ""
        print(f"{description}: {count}done in {time.perf_counter() - start:.1f} s", file=self.lines, flush=True)
