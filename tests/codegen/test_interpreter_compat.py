"""Triton ≤ 3.6's interpreter on numpy ≥ 2.4 (codegen/interpreter_compat.py): a kernel whose loop
bound is an argument failed with "only 0-dimensional arrays can be converted to Python scalars"."""
from __future__ import annotations

import operator
import types

import numpy as np
import pytest
import torch

from slimfx.codegen.interpreter_compat import patch_module
from slimfx.codegen.kernel import Kernel

LOOP_OVER_AN_ARGUMENT = '''import triton
import triton.language as tl


@triton.jit
def kernel(x_ptr, out_ptr, n):
    acc = tl.zeros((1,), tl.float32)
    for i in range(0, n):
        acc += tl.load(x_ptr + i + tl.arange(0, 1))
    tl.store(out_ptr + tl.arange(0, 1), acc)
'''


class _Scope:
    def set_attr(self, obj, name, value):
        setattr(obj, name, value)


def _tensor_class():
    class Tensor:
        def __init__(self, data):
            self.handle = types.SimpleNamespace(data=data)
    return Tensor


def _int_of_data(tensor, scope):  # triton 3.6's, word for word
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def _older_int_of_data(tensor):
    tensor.__index__ = lambda self: int(self.handle.data)


def _int_of_squeezed_data(tensor, scope):  # triton 3.9's
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


@pytest.mark.parametrize("old, args", [(_int_of_data, (_Scope(),)), (_older_int_of_data, ())])
def test_an_interpreter_that_does_not_squeeze_gets_an_index_that_does(old, args):
    interpreter = types.SimpleNamespace(_patch_lang_tensor=old)
    assert patch_module(interpreter)
    tensor = _tensor_class()
    interpreter._patch_lang_tensor(tensor, *args)
    assert operator.index(tensor(np.array([7], dtype=np.int32))) == 7
    assert operator.index(tensor(np.array([[3]]))) == 3
    assert operator.index(tensor(np.array(5))) == 5


def test_the_unpatched_index_is_what_fails_on_this_numpy():
    """What the patch is for, shown on the installed numpy (2.4 refuses; older ones warn)."""
    tensor = _tensor_class()
    _int_of_data(tensor, _Scope())
    if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4):
        with pytest.raises(TypeError, match="0-dimensional"):
            operator.index(tensor(np.array([7])))


def test_an_interpreter_that_squeezes_is_left_as_it_is():
    interpreter = types.SimpleNamespace(_patch_lang_tensor=_int_of_squeezed_data)
    assert not patch_module(interpreter)
    assert interpreter._patch_lang_tensor is _int_of_squeezed_data
    assert not patch_module(types.SimpleNamespace())  # none to wrap


def test_a_kernel_looping_to_an_argument_runs_in_the_installed_interpreter(tmp_path):
    """Through Kernel.compile, as every generated kernel: fails on triton 3.6 + numpy 2.4 without the patch."""
    fn = Kernel("rows", LOOP_OVER_AN_ARGUMENT, [], [], []).compile(tmp_path)
    x, out = torch.arange(5, dtype=torch.float32), torch.zeros(1)
    fn[(1,)](x, out, 5)
    assert out.item() == 10.0
