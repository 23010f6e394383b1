"""The GEMM template (codegen/emit_gemm.py) against the reference ops, through Triton's
interpreter without a GPU: packed int8/int4/int2 weights (symmetric, asymmetric with packed whole
zero points or float ones, groups that do not divide the input, per-channel) with fused epilogues
on ragged shapes, and dense linear, mm and addmm. The reference is the op eager PyTorch runs (`slimfx::quant_linear` dequantizes and calls
F.linear), never the template's own arithmetic."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from slimfx.codegen.emit import emit_all
from slimfx.codegen.emit_gemm import emit_gemm
from slimfx.codegen.expr import Unsupported
from slimfx.codegen.partition import partition
from slimfx.codegen.tuning import gemm_configs

from graphs import EPILOGUES, QuantLinear, SharedInput, capture_module


def _gemm_kernel(gm):
    groups = [g for g in partition(gm) if g.kind == "gemm"]
    assert len(groups) == 1, [g.describe() for g in partition(gm)]
    return emit_gemm(groups[0]), groups[0]


def _check(model, x, x_run=None, tol=1e-4, config=None):
    """Export `model` at x, emit its GEMM group, launch the kernel at x_run (another batch size:
    the shapes are symbolic; under `config` if given) and compare with the model's own output."""
    gm = capture_module(model, x)
    kernel, group = _gemm_kernel(gm)
    assert group.outputs == [group.nodes[-1]]  # the epilogue's end is the one value stored
    x_run = x if x_run is None else x_run
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(x_run)
    (got,) = kernel.launch([interp.env[node] for node, _ in kernel.inputs], config=config)
    with torch.no_grad():
        want = model(x_run)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)
    return kernel


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 40), bits=st.sampled_from([2, 4, 8]),
       group=st.sampled_from([8, 16, 32, None]), kind=st.sampled_from(["sym", "int", "float"]), bias=st.booleans(),
       epilogue=st.sampled_from(sorted(EPILOGUES)))
def test_packed_gemm_with_its_epilogue_equals_the_reference_op(m, k, n, bits, group, kind, bias, epilogue):
    model = QuantLinear(k, n, bits, group, kind == "sym", bias, epilogue, zero="float" if kind == "float" else "int")
    x = torch.randn(2, k)
    _check(model, x, torch.randn(m, k))


@pytest.mark.parametrize("m,k,n,group,sym", [(1, 576, 1536, 128, True), (7, 1823, 781, 64, False)])
def test_int4_gemm_on_model_sized_ragged_shapes(m, k, n, group, sym):
    # 1823 inputs at group 64: 28 groups of 64 and a last one of 31.
    _check(QuantLinear(k, n, 4, group, sym, True, "silu"), torch.randn(2, k), torch.randn(m, k))


@pytest.mark.parametrize("bits,group", [(4, 32), (2, 16), (8, 8)])
@pytest.mark.parametrize("zero", ["int", "float"])
def test_asymmetric_zero_points_of_each_kind(bits, group, zero):
    """Packed whole zero points are extracted in the kernel as the codes are (several groups
    share a byte at int4/int2: 70 inputs hold 3-9 groups, the last ragged); float ones are read
    as they are."""
    model = QuantLinear(70, 40, bits, group, False, True, "none", zero=zero)
    assert model.zeros.dtype == (torch.uint8 if zero == "int" else torch.float16)
    kernel = _check(model, torch.randn(2, 70), torch.randn(5, 70))
    assert ("* ZB +" in kernel.source) == (zero == "int")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k,group,form", [(300, 16, "BK // 16"), (300, 128, "BK <= 128"), (100, 48, "// GROUP"),
                                          (90, None, "k0 // 90")])
@pytest.mark.parametrize("gemv", [False, True])
def test_each_way_of_reading_group_values(bits, k, group, form, gemv):
    """Scales and zero points are read once per group a step touches: a step of whole groups
    (16 | BK), a step inside one group (BK | 128), one group per row; a group of 48 straddles
    steps and is read per weight. The tile config: the interpreter's default, or a GEMV one."""
    model = QuantLinear(k, 24, bits, group, False, True, "none", zero="int")
    config = next(c for c in gemm_configs(1 if gemv else 16)
                  if c["kwargs"]["GEMV"] == gemv and c["kwargs"]["BK"] == (128 if gemv else 64))
    kernel = _check(model, torch.randn(2, k), torch.randn(1 if gemv else 5, k), config=config)
    assert form in kernel.source


def test_int8_per_channel_and_int2_on_a_3d_input():  # M = batch × 3 rows
    for bits, group in ((8, None), (2, 16)):
        model = QuantLinear(40, 24, bits, group, False, False, "none")
        _check(model, torch.randn(2, 3, 40), torch.randn(5, 3, 40))


def test_merged_gemms_with_different_zero_point_kinds():
    """One input, one format (int4 g8 asymmetric): q has packed zero points, k float ones, v
    packed again; the merged kernel reads each anchor's the way it is stored."""
    model = SharedInput(24, (16, 16, 16), 4, 8, False, zeros=["int", "float", "int"])
    gm = capture_module(model, torch.randn(2, 24))
    (group,) = [g for g in partition(gm) if g.kind == "gemm"]
    kernel = emit_gemm(group)
    assert len(group.anchors) == 3 and "* ZB +" in kernel.source
    x = torch.randn(5, 24)
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(x)
        got = kernel.launch([interp.env[node] for node, _ in kernel.inputs])
        want = model(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("widths,swiglu", [((40, 40), True), ((40, 16, 16), False), ((24, 24, 24), False)])
@pytest.mark.parametrize("bits,sym", [(4, True), (2, False)])
def test_gemms_reading_one_input_are_one_kernel(widths, swiglu, bits, sym):
    # gate/up with the SwiGLU product (one store), q/k/v of GQA widths (segments), of MHA widths
    # (three accumulators over one loaded input tile).
    model = SharedInput(24, widths, bits, 8, sym, swiglu)
    gm = capture_module(model, torch.randn(2, 24))
    (group,) = [g for g in partition(gm) if g.kind == "gemm"]
    assert len(group.anchors) == len(widths)
    kernel = emit_gemm(group)
    assert len(kernel.outputs) == (1 if swiglu else len(widths))
    x = torch.randn(19, 24)
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(x)
        want = model(x)
    got = kernel.launch([interp.env[node] for node, _ in kernel.inputs])
    for g, w in zip(got, want if not swiglu else (want,)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


class _Dense(torch.nn.Module):
    def __init__(self, how: str):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(24, 40, generator=gen), requires_grad=False)
        self.b = torch.nn.Parameter(torch.randn(24, generator=gen), requires_grad=False)
        self.how = how

    def forward(self, x):
        if self.how == "linear":
            return F.gelu(F.linear(x, self.w, self.b), approximate="tanh")
        if self.how == "mm":  # the weight read through a transposed view
            return torch.sigmoid(x @ self.w.t())
        return torch.addmm(self.b, x, self.w.t()) * 2.0


@pytest.mark.parametrize("how", ["linear", "mm", "addmm"])
def test_dense_gemms(how):
    kernel = _check(_Dense(how), torch.randn(2, 40), torch.randn(11, 40))
    assert "input_precision=\"ieee\"" in kernel.source  # fp32 products, not TF32, on a GPU too


def test_an_epilogue_through_a_transpose_is_refused_by_name():
    class Rotated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = QuantLinear(16, 16, 4, 16, True, False, "none")

        def forward(self, x):
            y = self.inner(x).view(x.shape[0], 4, 4).transpose(1, 2)
            return torch.relu(y)

    gm = capture_module(Rotated(), torch.randn(3, 16))
    group = next(g for g in partition(gm) if g.kind == "gemm")
    assert [n.target for n in group.nodes][-1] is torch.ops.aten.relu.default  # the partitioner fused it
    with pytest.raises(Unsupported, match=r"^view .* does not line up with the GEMM's \[M=s\d+, N=16\]"):
        emit_gemm(group)
    # The lowering then runs the GEMM alone and leaves the epilogue to eager ops, saying why.
    done = emit_all([group])
    assert [k.template for k in done.kernels] == ["gemm"] and len(done.kernels[0].nodes) == 1
    (why,) = [why for _, why in done.eager]
    assert re.fullmatch(r"epilogue not fused: a value \(s\d+, 4, 4\) does not line up with the GEMM's \[M=s\d+, N=16\]", why)


# float16 under the interpreter is IEEE half (numpy): the kernel's products go into tl.dot as
# float16 tiles and accumulate in float32 as eager's do; the tolerance is a few float16 steps.
@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 40), bits=st.sampled_from([2, 4, 8]),
       group=st.sampled_from([16, None]), kind=st.sampled_from(["sym", "int", "float"]), bias=st.booleans(),
       epilogue=st.sampled_from(sorted(EPILOGUES)))
def test_float16_packed_gemm_with_its_epilogue_equals_the_reference_op(m, k, n, bits, group, kind, bias, epilogue):
    # The bias stays float32: quant_linear's eager meaning casts it to x's dtype, as the kernel does.
    model = QuantLinear(k, n, bits, group, kind == "sym", bias, epilogue, zero="float" if kind == "float" else "int")
    kernel = _check(model, torch.randn(2, k).half(), torch.randn(m, k).half(), tol=4e-3)
    assert "tl.float16" in kernel.source


@pytest.mark.parametrize("how", ["linear", "mm", "addmm"])
def test_float16_dense_gemms(how):
    _check(_Dense(how).half(), torch.randn(2, 40).half(), torch.randn(11, 40).half(), tol=4e-3)


def test_merged_float16_gemms_reading_one_input():
    model = SharedInput(24, (40, 40), 4, 8, True, swiglu=True)
    gm = capture_module(model, torch.randn(2, 24).half())
    (group,) = [g for g in partition(gm) if g.kind == "gemm"]
    kernel = emit_gemm(group)
    x = torch.randn(19, 24).half()
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(x)
        want = model(x)
    (got,) = kernel.launch([interp.env[node] for node, _ in kernel.inputs])
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, atol=4e-3, rtol=4e-3)


def test_a_weight_in_another_dtype_than_the_input_is_refused_by_name():
    # Eager F.linear refuses such a pair, so only an edited graph has one; the template must still
    # not read a float32 weight into a float16 tl.dot.
    gm = capture_module(_Dense("linear").half(), torch.randn(2, 40).half())
    (group,) = [g for g in partition(gm) if g.kind == "gemm"]
    weight = group.anchor.args[1]
    weight.meta["val"] = weight.meta["val"].float()
    with pytest.raises(Unsupported, match=rf"^{weight.name}: a torch.float32 weight for a torch.float16 input$"):
        emit_gemm(group)


# The GEMV form (no tl.dot: a broadcast product summed over each K step) of decode-step configs:
# row tiles of exactly 1 or 4 rows, column tiles down to 8 (codegen/tuning.py).
GEMV = [c for bucket in (1, 4) for c in gemm_configs(bucket) if c["kwargs"]["GEMV"]]


def _name(config) -> str:
    return "BM{BM}-BN{BN}-BK{BK}".format(**config["kwargs"]) + f"-w{config['num_warps']}"


@pytest.mark.parametrize("config", GEMV, ids=_name)
def test_every_gemv_config_equals_the_reference_op(config):
    # 300 inputs: ragged against every BK and against groups of 32 (9 of them and one of 12);
    # 40 outputs against every BN; 3 rows in a row tile of 4.
    assert "tl.sum(" in _check(QuantLinear(300, 40, 4, 32, False, True, "silu"), torch.randn(2, 300),
                               torch.randn(1 if config["kwargs"]["BM"] == 1 else 3, 300), config=config).source


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 4), k=st.integers(1, 70), n=st.integers(1, 40), bits=st.sampled_from([2, 4, 8]),
       group=st.sampled_from([8, 16, 32, None]), kind=st.sampled_from(["sym", "int", "float"]), bias=st.booleans(),
       epilogue=st.sampled_from(sorted(EPILOGUES)), half=st.booleans(), pick=st.integers(0, 99))
def test_packed_gemv_with_its_epilogue_equals_the_reference_op(m, k, n, bits, group, kind, bias, epilogue, half,
                                                               pick):
    configs = [c for c in GEMV if c["kwargs"]["BM"] == (1 if m == 1 else 4)]
    model = QuantLinear(k, n, bits, group, kind == "sym", bias, epilogue, zero="float" if kind == "float" else "int")
    dtype = torch.float16 if half else torch.float32
    _check(model, torch.randn(2, k, dtype=dtype), torch.randn(m, k, dtype=dtype), tol=4e-3 if half else 1e-4,
           config=configs[pick % len(configs)])


@pytest.mark.parametrize("how", ["linear", "mm", "addmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_gemv(how, dtype):
    config = next(c for c in GEMV if c["kwargs"]["BN"] == 16 and c["kwargs"]["BM"] == 1)
    _check(_Dense(how).to(dtype), torch.randn(2, 40, dtype=dtype), torch.randn(1, 40, dtype=dtype),
           tol=4e-3 if dtype == torch.float16 else 1e-4, config=config)


@pytest.mark.parametrize("widths,swiglu", [((40, 40), True), ((40, 16, 16), False)])
def test_merged_gemms_as_gemv(widths, swiglu):
    model = SharedInput(24, widths, 4, 8, False, swiglu)
    gm = capture_module(model, torch.randn(2, 24))
    (group,) = [g for g in partition(gm) if g.kind == "gemm"]
    kernel = emit_gemm(group)
    x = torch.randn(3, 24)
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(x)
        want = model(x)
    config = next(c for c in GEMV if c["kwargs"]["BM"] == 4 and c["kwargs"]["BN"] == 8)
    got = kernel.launch([interp.env[node] for node, _ in kernel.inputs], config=config)
    for g, w in zip(got, want if not swiglu else (want,), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
