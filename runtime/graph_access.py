"""Who may use a compiled graph while another thread changes it: a readers-writer lock per
GraphModule. Calls read the lowering (any number at once); `unlowered(…)` and `lower(…)`
change it — saving, copying and merging put the reference ops back for their length, and the
converted kernel buffers go — so they wait for the calls in flight and hold new ones back. A
server that saved or copied a model while serving it got calls that failed ("no attribute
'qweight_int4pack'") or quietly ran the reference ops.

Re-entrant within one thread: a call under `unlowered` (training under the Triton backend)
reads, and a change inside a change (lower() in unlowered's `finally`) goes through.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

__all__ = ["reading", "writing"]

_MADE = threading.Lock()  # finding or creating a graph's lock


class _ReadWrite:
    def __init__(self):
        self.cond = threading.Condition()
        self.readers = 0
        self.writer: int | None = None  # the thread changing the graph
        self.depth = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()
        with self.cond:
            while self.writer is not None and self.writer != me:
                self.cond.wait()
            self.readers += 1
        try:
            yield
        finally:
            with self.cond:
                self.readers -= 1
                self.cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self.cond:
            if self.writer != me:
                while self.writer is not None or self.readers:
                    self.cond.wait()
                self.writer = me
            self.depth += 1
        try:
            yield
        finally:
            with self.cond:
                self.depth -= 1
                if not self.depth:
                    self.writer = None
                    self.cond.notify_all()


# Beside the modules, not on them: a lock cannot be deep-copied, and `copy.deepcopy(cm.program)`
# failed with one in the GraphModule's __dict__.
_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _lock(gm) -> _ReadWrite:
    lock = _LOCKS.get(gm)  # every call comes here: the module-wide lock only to make one
    if lock is None:
        with _MADE:
            lock = _LOCKS.get(gm)
            if lock is None:
                lock = _LOCKS[gm] = _ReadWrite()
    return lock


def reading(gm):
    """Within the block, `gm`'s lowering stays as it is (other threads may read it too)."""
    return _lock(gm).reading()


def writing(gm):
    """Within the block, this thread alone uses `gm` (calls of other threads wait)."""
    return _lock(gm).writing()
