"""slimfx::quant_linear: eager == dequantize-then-linear, fake/autograd registrations, and a
torch.export round trip with dynamic batch and sequence dims."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import slimfx.runtime.ops as ops
from slimfx.runtime.formats import QuantFormat, dequantize, quantize_rtn

CASES = [(7, 100, 32), (5, 576, 128), (3, 33, None), (4, 64, 64)]  # (out, in, group)


def _packed(out, cols, group, bits, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) * 0.05
    return quantize_rtn(w, QuantFormat(bits, group, sym)), torch.randn(out, generator=g)


def _args(qw, bias):
    return (qw.qweight, qw.scales, qw.zeros, bias, *ops.quant_linear_args(qw))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("out, cols, group", CASES, ids=str)
def test_eager_equals_dequantize_then_linear(bits, sym, out, cols, group):
    qw, bias = _packed(out, cols, group, bits, sym)
    x = torch.randn(2, 3, cols)
    for b in (bias, None):
        assert torch.equal(ops.apply_quant_linear(x, qw, b), F.linear(x, dequantize(qw), b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_computes_in_the_input_dtype(dtype):
    qw, bias = _packed(7, 100, 32, 4, False)
    x = torch.randn(2, 5, 100, dtype=dtype)
    y = ops.apply_quant_linear(x, qw, bias)
    assert y.dtype == dtype
    assert torch.equal(y, F.linear(x, dequantize(qw).to(dtype), bias.to(dtype)))


def test_opcheck_fake_and_autograd_registrations():
    qw, bias = _packed(7, 100, 32, 4, False)
    x = torch.randn(3, 100, requires_grad=True)
    torch.library.opcheck(torch.ops.slimfx.quant_linear.default, (x, *_args(qw, bias.requires_grad_())))
    qw, _ = _packed(5, 40, None, 8, True)
    torch.library.opcheck(torch.ops.slimfx.quant_linear.default, (torch.randn(2, 4, 40), *_args(qw, None)))


def test_gradients_match_dequantize_then_linear():
    qw, bias = _packed(7, 100, 32, 2, True)
    x = torch.randn(2, 3, 100)
    x1, b1 = x.clone().requires_grad_(), bias.clone().requires_grad_()
    x2, b2 = x.clone().requires_grad_(), bias.clone().requires_grad_()
    g = torch.randn(2, 3, 7)
    ops.apply_quant_linear(x1, qw, b1).backward(g)
    F.linear(x2, dequantize(qw), b2).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


class _QuantLinear(torch.nn.Module):
    def __init__(self, qw, bias):
        super().__init__()
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.bias = torch.nn.Parameter(bias)
        self.ints = ops.quant_linear_args(qw)

    def forward(self, x):
        return ops.quant_linear(x, self.qweight, self.scales, self.zeros, self.bias, *self.ints)


@pytest.mark.parametrize("sym", [True, False])
def test_export_save_load_with_dynamic_batch(tmp_path, sym):
    module = _QuantLinear(*_packed(7, 100, 32, 4, sym))
    dims = {"x": {0: Dim("batch"), 1: Dim("seq")}}
    ep = torch.export.export(module, (torch.randn(3, 4, 100),), dynamic_shapes=dims, strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.slimfx.quant_linear.default]
    torch.export.save(ep, tmp_path / "q.pt2")
    loaded = torch.export.load(tmp_path / "q.pt2").module()
    for shape in [(5, 2, 100), (2, 9, 100)]:
        x = torch.randn(shape)
        assert torch.equal(loaded(x), module(x))


def test_fake_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qw, bias = _packed(7, 100, 32, 4, True)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                for t in (torch.randn(2, 3, 100), *_args(qw, bias))]
        y = ops.quant_linear(*fake)
    assert y.shape == (2, 3, 7) and y.dtype == torch.float32


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.randn(2, 99)), "last dim is 99, expected 100"),
    (dict(bits=3), "bits=3"),
    (dict(group=0), "must be positive"),
    (dict(group=64), r"scales is \(7, 4\), expected \(7, 2\)"),
    (dict(qweight=torch.zeros(7, 50, dtype=torch.int8)), "uint8"),
    (dict(in_features=90), "bytes per row"),
])
def test_bad_arguments_say_what_is_wrong(change, match):
    qw, bias = _packed(7, 100, 32, 4, True)
    args = dict(x=torch.randn(2, 100), qweight=qw.qweight, scales=qw.scales, zeros=None, bias=bias,
                bits=4, group=32, in_features=100)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.quant_linear(*args.values())


def test_reimport_keeps_one_registration():
    op = torch.ops.slimfx.quant_linear.default
    importlib.reload(ops)
    assert torch.ops.slimfx.quant_linear.default is op
    qw, bias = _packed(7, 100, 32, 4, True)
    x = torch.randn(2, 100)
    assert torch.equal(ops.apply_quant_linear(x, qw, bias), F.linear(x, dequantize(qw), bias))
