"""slimfx::quant_linear: hand-computed outputs on literal packed bytes, eager == a linear over a
weight decoded from the bytes by an independent decoder (not runtime/formats.py), fake/autograd
registrations, and a torch.export round trip with dynamic batch and sequence dims. Zero points
come three ways, told apart by dtype: packed whole ones (uint8), float ones (fp16), and the fp16
whole ones of artifacts written before zeros were packed, which compute the same weight."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import slimfx.runtime.ops as ops
from slimfx.runtime.formats import QuantFormat, quantize_rtn, unpack

CASES = [(7, 100, 32), (5, 576, 128), (3, 33, None), (4, 64, 64)]  # (out, in, group)


KINDS = ["sym", "int", "float"]  # symmetric, packed whole zero points, float zero points


def _fmt(bits, group, kind) -> QuantFormat:
    return QuantFormat(bits, group, kind == "sym", "float" if kind == "float" else "int")


def _packed(out, cols, group, bits, kind, seed=0):
    """`kind` is one of KINDS, or a bool for sym (True) / packed whole zero points (False)."""
    kind = {True: "sym", False: "int"}.get(kind, kind)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) * 0.05 + (0.02 if kind == "float" else 0.0)
    return quantize_rtn(w, _fmt(bits, group, kind)), torch.randn(out, generator=g)


def _args(qw, bias):
    return (qw.qweight, qw.scales, qw.zeros, bias, *ops.quant_linear_args(qw))


def _decode(qweight, scales, zeros, bits, group, in_features) -> torch.Tensor:
    """float64 [out, in] from the packed buffers, bit by bit, following the layout in
    runtime/formats.py's docstring (code c of a row is byte c // (8 // bits), bits
    [(c % (8 // bits)) * bits, ...)); symmetric zero point 2^(bits-1); group k covers columns
    [k * group, (k + 1) * group)); uint8 zeros hold zero point k the same way codes hold code c,
    float zeros hold them as they are. Independent of slimfx's unpack/dequantize."""
    q = qweight.numpy().astype(np.int64)
    s = scales.float().numpy().astype(np.float64)
    per = 8 // bits
    z = None
    if zeros is not None and zeros.dtype == torch.uint8:
        zb = zeros.numpy().astype(np.int64)
        z = np.array([[(zb[r, k // per] >> ((k % per) * bits)) & ((1 << bits) - 1) for k in range(s.shape[1])]
                      for r in range(s.shape[0])], dtype=np.float64)
    elif zeros is not None:
        z = zeros.float().numpy().astype(np.float64)
    w = np.zeros((q.shape[0], in_features))
    for r in range(q.shape[0]):
        for c in range(in_features):
            code = (q[r, c // per] >> ((c % per) * bits)) & ((1 << bits) - 1)
            zero = 2 ** (bits - 1) if z is None else z[r, c // group]
            w[r, c] = (code - zero) * s[r, c // group]
    return torch.from_numpy(w)


def _expected(x, qw, bias):
    """x @ Wᵀ + b in float64, W decoded independently."""
    w = _decode(qw.qweight, qw.scales, qw.zeros, *ops.quant_linear_args(qw))
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


# Literal packed weights and their outputs, worked by hand.
# int4, 2 x 5, group 2 (groups [0:2], [2:4] and a ragged [4:5]).
#   row 0 bytes 0x9F 0x08 0x03 -> codes [15, 9, 8, 0, 3]; row 1 bytes 0x78 0xA1 0x0C -> [8, 7, 1, 10, 12].
#   symmetric (zero 8): signed [7, 1, 0, -8, -5] and [0, -1, -7, 2, 4];
#     scales [0.5, 0.25, 2] and [1, 0.125, 0.0625] -> W = [[3.5, 0.5, 0, -2, -10], [0, -1, -0.875, 0.25, 0.25]];
#     x = [1, 2, 3, 4, 5]: y = [3.5 + 1 + 0 - 8 - 50, 0 - 2 - 2.625 + 1 + 1.25] = [-53.5, -2.375], + bias [0.5, -1].
#   asymmetric, zeros [7, 9, 3] and [8, 8, 15]: W = [[4, 1, -0.25, -2.25, 0], [0, -1, -0.875, 0.25, -0.1875]]
#     y = [4 + 2 - 0.75 - 9 + 0, 0 - 2 - 2.625 + 1 - 0.9375] = [-3.75, -4.5625], + bias [0.5, -1].
#     Packed 4 bits each, little end first: [0x97, 0x03] and [0x88, 0x0F]; as fp16 whole numbers
#     (artifacts written before zeros were packed) the same weight.
#   float zeros [7.5, 9, 3] and [8, 8, 15.25]: W = [[3.75, 0.75, -0.25, -2.25, 0], [0, -1, -0.875, 0.25, -0.203125]]
#     y = [3.75 + 1.5 - 0.75 - 9 + 0, 0 - 2 - 2.625 + 1 - 1.015625] = [-4.5, -4.640625], + bias [0.5, -1].
# int2, 1 x 5, per channel: bytes 0b11100100 0b11 -> codes [0, 1, 2, 3, 3], zero 2, scale 0.5
#   -> W = [-1, -0.5, 0, 0.5, 0.5]; y = -1 - 1 + 0 + 2 + 2.5 = 2.5.
# int8, 1 x 3, per channel: bytes [130, 0, 255], zero 128, scale 0.25 -> W = [0.5, -32, 31.75];
#   y = 0.5 - 64 + 95.25 = 31.75.
_INT4_BYTES = [[0x9F, 0x08, 0x03], [0x78, 0xA1, 0x0C]]
_INT4_SCALES = [[0.5, 0.25, 2.0], [1.0, 0.125, 0.0625]]
LITERAL = {
    "int4-sym": (_INT4_BYTES, _INT4_SCALES, None, 4, 2, [1, 2, 3, 4, 5], [-53.0, -3.375]),
    "int4-asym-packed": (_INT4_BYTES, _INT4_SCALES, torch.tensor([[0x97, 0x03], [0x88, 0x0F]], dtype=torch.uint8),
                         4, 2, [1, 2, 3, 4, 5], [-3.25, -5.5625]),
    "int4-asym-fp16-whole": (_INT4_BYTES, _INT4_SCALES, torch.tensor([[7, 9, 3], [8, 8, 15]], dtype=torch.float16),
                             4, 2, [1, 2, 3, 4, 5], [-3.25, -5.5625]),
    "int4-float-zeros": (_INT4_BYTES, _INT4_SCALES, torch.tensor([[7.5, 9, 3], [8, 8, 15.25]], dtype=torch.float16),
                         4, 2, [1, 2, 3, 4, 5], [-4.0, -5.640625]),
    "int2": ([[0b11100100, 0b11]], [[0.5]], None, 2, 5, [1, 2, 3, 4, 5], [2.5]),
    "int8": ([[130, 0, 255]], [[0.25]], None, 8, 3, [1, 2, 3], [31.75]),
}


@pytest.mark.parametrize("case", list(LITERAL))
def test_literal_packed_weights_give_hand_computed_outputs(case):
    qweight, scales, zeros, bits, group, x, y = LITERAL[case]
    out, cols = len(scales), len(x)
    bias = torch.tensor([0.5, -1.0][:out]) if bits == 4 else None
    args = (torch.tensor(qweight, dtype=torch.uint8), torch.tensor(scales, dtype=torch.float16), zeros, bias,
            bits, group, cols)
    result = ops.quant_linear(torch.tensor([x], dtype=torch.float32), *args)
    assert result.tolist() == [y]
    # the independent decoder used below agrees with the hand-worked weights
    assert _expected(torch.tensor([x], dtype=torch.float32), _Packed(*args[:3], bits, group, cols), bias).tolist() == [y]


class _Packed:
    """Just enough of a QuantizedWeight for `ops.quant_linear_args` and `_expected`."""

    def __init__(self, qweight, scales, zeros, bits, group, in_features):
        self.qweight, self.scales, self.zeros = qweight, scales, zeros
        kind = "sym" if zeros is None else ("int" if zeros.dtype == torch.uint8 else "float")
        self.fmt = _fmt(bits, None if group == in_features else group, kind)
        self.in_features = in_features


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out, cols, group", CASES, ids=str)
def test_eager_equals_a_linear_over_the_independently_decoded_weight(bits, kind, out, cols, group):
    qw, bias = _packed(out, cols, group, bits, kind)
    assert kind == "sym" or qw.zeros.dtype == {"int": torch.uint8, "float": torch.float16}[kind]
    x = torch.randn(2, 3, cols)
    for b in (bias, None):
        y = ops.apply_quant_linear(x, qw, b)
        assert y.dtype == torch.float32 and y.shape == (2, 3, out)
        # float32 matmul against float64: only summation order differs
        torch.testing.assert_close(y.double(), _expected(x, qw, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_computes_in_the_input_dtype(dtype):
    qw, bias = _packed(7, 100, 32, 4, False)
    x = torch.randn(2, 5, 100, dtype=dtype)
    y = ops.apply_quant_linear(x, qw, bias)
    assert y.dtype == dtype
    # the weight is rounded to x's dtype before the linear (the op's documented meaning)
    w = _decode(qw.qweight, qw.scales, qw.zeros, *ops.quant_linear_args(qw)).to(dtype)
    assert torch.equal(y, F.linear(x, w, bias.to(dtype)))


def test_opcheck_fake_and_autograd_registrations():
    qw, bias = _packed(7, 100, 32, 4, False)
    x = torch.randn(3, 100, requires_grad=True)
    torch.library.opcheck(torch.ops.slimfx.quant_linear.default, (x, *_args(qw, bias.requires_grad_())))
    qw, _ = _packed(5, 40, None, 8, True)
    torch.library.opcheck(torch.ops.slimfx.quant_linear.default, (torch.randn(2, 4, 40), *_args(qw, None)))


def test_gradients_match_a_linear_over_the_decoded_weight():
    qw, bias = _packed(7, 100, 32, 2, True)
    x = torch.randn(2, 3, 100)
    x1, b1 = x.clone().requires_grad_(), bias.clone().requires_grad_()
    x2, b2 = x.clone().requires_grad_(), bias.clone().requires_grad_()
    g = torch.randn(2, 3, 7)
    ops.apply_quant_linear(x1, qw, b1).backward(g)
    F.linear(x2, _decode(qw.qweight, qw.scales, qw.zeros, *ops.quant_linear_args(qw)).float(), b2).backward(g)
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


@pytest.mark.parametrize("kind", KINDS)
def test_export_save_load_with_dynamic_batch(tmp_path, kind):
    module = _QuantLinear(*_packed(7, 100, 32, 4, kind))
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
    (dict(zeros=torch.zeros(7, 4, dtype=torch.uint8)), r"zeros is torch.uint8 \(7, 4\), expected \(7, 2\)"),
    (dict(zeros=torch.zeros(7, 2, dtype=torch.float16)), r"zeros is torch.float16 \(7, 2\), expected \(7, 4\)"),
    (dict(zeros=torch.zeros(7, 4, dtype=torch.int32)), "pass uint8 .packed whole zero points. or a float tensor"),
])
def test_bad_arguments_say_what_is_wrong(change, match):
    qw, bias = _packed(7, 100, 32, 4, True)
    args = dict(x=torch.randn(2, 100), qweight=qw.qweight, scales=qw.scales, zeros=None, bias=bias,
                bits=4, group=32, in_features=100)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.quant_linear(*args.values())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fp16_whole_zero_points_of_older_artifacts_compute_the_same(bits):
    """Artifacts written before zero points were packed hold them as fp16 whole numbers: read as
    float zero points they give the packed weight's output bit for bit (both ops)."""
    qw, bias = _packed(7, 100, 32, bits, "int")
    old = unpack(qw.zeros, bits, 4).to(torch.float16)  # 100 inputs = 4 groups of 32
    x = torch.randn(2, 3, 100)
    ints = ops.quant_linear_args(qw)
    assert torch.equal(ops.quant_linear(x, qw.qweight, qw.scales, old, bias, *ints), ops.apply_quant_linear(x, qw, bias))
    assert torch.equal(ops.dequantize_op(qw.qweight, qw.scales, old, *ints),
                       ops.dequantize_op(qw.qweight, qw.scales, qw.zeros, *ints))


def test_reimport_keeps_one_registration():
    op = torch.ops.slimfx.quant_linear.default
    importlib.reload(ops)
    assert torch.ops.slimfx.quant_linear.default is op
    qw, bias = _packed(7, 100, 32, 4, True)
    x = torch.randn(2, 100)
    torch.testing.assert_close(ops.apply_quant_linear(x, qw, bias).double(), _expected(x, qw, bias),
                               rtol=1e-5, atol=1e-6)
