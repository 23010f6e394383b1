"""Triton's interpreter (TRITON_INTERPRET=1) on numpy 2.4 and later.

Triton up to 3.6 turns an interpreted scalar into a Python int with `int(handle.data)`, and its
scalars are 1-element arrays, not 0-d ones; numpy 2.4 refuses `int()` of those ("only
0-dimensional arrays can be converted to Python scalars"), so every kernel whose `range` or
`tl.static_range` bound is a kernel argument failed. Triton 3.9 squeezes first; `patch()` gives
older interpreters the same `__index__`. Nothing changes on a GPU, where kernels are compiled.
"""
from __future__ import annotations

import functools
import inspect

__all__ = ["patch", "patch_module"]


def _squeezing_index(self):
    return int(self.handle.data.squeeze())


@functools.cache
def patch() -> bool:
    """Give the interpreter the squeezing `__index__` if its own does not squeeze; True if patched.
    Once per process: the interpreter sets `__index__` at every launch from `_patch_lang_tensor`,
    so that function is the one wrapped."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton, or one without an interpreter: nothing to mend
        return False
    return patch_module(interpreter)


def patch_module(interpreter) -> bool:
    """`patch()` on the module given (triton.runtime.interpreter, or a stand-in in a test)."""
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or ".squeeze()" in _source(original):
        return False

    @functools.wraps(original)
    def patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if hasattr(scope, "set_attr"):  # newer interpreters: the scope puts the attribute back after the launch
            scope.set_attr(tensor, "__index__", _squeezing_index)
        else:  # older ones set it on the class for good
            tensor.__index__ = _squeezing_index

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):  # no source shipped: assume the old behaviour, the wrap is harmless
        return ""
