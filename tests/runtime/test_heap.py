import gc
import weakref

from slimfx.runtime.heap import return_freed_heap


class _Node:
    pass


def test_unreachable_cycles_are_collected_before_the_heap_is_trimmed():
    """What a cycle holds (a graph's nodes refer to each other) is only freed by the collector;
    trimming the heap before collecting would hand back nothing of it."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    del a, b
    gc.disable()  # no automatic collection may free the cycle first
    try:
        assert alive() is not None
        return_freed_heap()
        assert alive() is None
    finally:
        gc.enable()
