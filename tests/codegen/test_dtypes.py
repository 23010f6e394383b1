"""Half-precision kernels (codegen/dtypes.py): float16 and bfloat16 values are read, computed in
float32, rounded after each op as eager rounds each op's result, and stored in their own format.

float16 is IEEE half in numpy, so Triton's interpreter runs it faithfully: it is checked tightly
here, and whole models against the eager backend. bfloat16 the interpreter keeps as raw 16-bit
integers — it truncates where a GPU rounds to nearest, and its tl.dot would multiply the bits — so
on a CPU bfloat16 row kernels are checked to one bfloat16 step and bfloat16 GEMMs must stay eager
ops (saying why); the bfloat16 GEMM kernels are checked on a GPU only."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from torch import fx

import slimfx
from slimfx.codegen.emit_rows import emit_rows
from slimfx.codegen.lower import lower_graph
from slimfx.codegen.partition import partition
from slimfx.models import tiny

from graphs import D, capture, capture_module, programs

BF16_GEMM_ON_CPU = "a bfloat16 GEMM under Triton's interpreter"


def _lowered(gm: fx.GraphModule) -> fx.GraphModule:
    new, summary = lower_graph(gm.graph)
    assert summary.eager == (), summary.eager  # every group here has a template: all kernels
    return fx.GraphModule(gm, new)


class _Cancel(torch.nn.Module):
    """(x + 2048) - 2048 in float16: each sum rounds to a whole number (float16's step is 1 from
    1024 and 2 from 2048), so eager gives whole numbers, never x. A kernel that kept the sum in
    float32 gives x back."""

    def forward(self, x):
        return torch.relu((x + 2048.0) - 2048.0 + x * 0.0), (x.float() * 3.0).half()


def test_each_half_precision_op_is_rounded_as_eager_rounds_it():
    x = torch.linspace(-3, 3, 8 * D).reshape(8, D).half()
    gm = capture_module(_Cancel(), x[:2])
    with torch.no_grad():
        got, want = _lowered(gm)(x), gm(x)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.float16
        assert torch.equal(g, w)  # numpy's float16 rounds to nearest even, as torch does
    assert torch.equal(want[0], want[0].round()) and (want[0] - torch.relu(x)).abs().max() > 0.4


class _LinearCancel(torch.nn.Module):
    """_Cancel in a GEMM's epilogue: the linear's float16 result and each epilogue op rounded."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.w = torch.nn.Parameter(torch.randn(24, 40, generator=gen).half(), requires_grad=False)
        self.b = torch.nn.Parameter(torch.randn(24, generator=gen).half(), requires_grad=False)

    def forward(self, x):
        return (torch.nn.functional.linear(x, self.w, self.b) + 2048.0) - 2048.0


def test_a_gemm_and_its_float16_epilogue_round_as_eager():
    x = torch.randn(6, 40).half()
    gm = capture_module(_LinearCancel(), x[:2])
    with torch.no_grad():
        got, want = _lowered(gm)(x), gm(x)
    assert got.dtype == torch.float16 and torch.equal(got, want)
    assert torch.equal(want, want.round())


class _Casts(torch.nn.Module):
    """Casts between float formats inside one group: what a float32 value loses on the way."""

    def forward(self, x):
        return x.half().float() - x, (torch.sigmoid(x).to(torch.bfloat16) * 2).float()


def test_casts_between_float_formats_round():
    x = torch.randn(5, D) * 3
    gm = capture_module(_Casts(), x[:2])
    with torch.no_grad():
        (lost, bf), (want_lost, want_bf) = _lowered(gm)(x), gm(x)
    assert want_lost.abs().max() > 1e-4  # float16 does lose something here
    assert torch.equal(lost, want_lost)
    # The interpreter truncates to bfloat16 where torch rounds to nearest: one step apart at most.
    assert (bf - want_bf).abs().max() <= 2 * 2 ** -8 * want_bf.abs().max()


@settings(max_examples=10, deadline=None)
@given(programs())
def test_random_float16_graphs_lowered_to_kernels_are_as_accurate_as_eager(steps):
    gm, x = capture(steps, dtype=torch.float16)
    lowered = _lowered(gm)
    exact = copy.deepcopy(gm).double()
    x_other = torch.randn(5, D, generator=torch.Generator().manual_seed(2)).half()
    with torch.no_grad():
        for inp in (x, x_other):
            for got, want, ref in zip(lowered(inp), gm(inp), exact(inp.double())):
                assert got.dtype == want.dtype == torch.float16
                # Eager rounds each op to float16 too; where the graph amplifies that, the kernels
                # may land elsewhere within eager's own error: within 2x it, plus 2 float16 steps.
                eager_error = float((want.double() - ref).abs().max())
                torch.testing.assert_close(got.double(), ref, atol=2 * eager_error + 1e-3, rtol=2 ** -9)


def test_a_float16_group_reads_and_writes_float16():
    gm, _ = capture([("mul", (0, 0)), ("mean", (1,)), ("sigmoid", (2,)), ("mul", (0, 3))], dtype=torch.float16)
    (group,) = [g for g in partition(gm) if g.kind == "rows"]
    source = emit_rows(group).source
    assert ".to(tl.float32)" in source and ".to(tl.float16)" in source


def test_a_kernel_refuses_inputs_of_another_dtype_than_it_was_generated_for():
    gm, x = capture([("mul", (0, 0)), ("mean", (1,))])
    (group,) = [g for g in partition(gm) if g.kind == "rows"]
    kernel = emit_rows(group)
    with pytest.raises(TypeError, match=r"its full input x is torch.float16, the kernel was generated for "
                                        r"torch.float32; compile the model again in the dtype it runs in"):
        kernel.launch([x.half()])


POLICY = "quantize blocks.*.** : Linear int4 group=16\nadapt blocks.*.attn.{q,v} lora rank=4 alpha=8"


def _compiled(dtype: torch.dtype, backend: str, device: str = "cpu"):
    lm = tiny("llama", layers=1)
    model = lm.model.to(device=device, dtype=dtype)
    inputs = {k: v.to(device) for k, v in lm.example_inputs.items()}
    cm = slimfx.compile(model, POLICY, example_inputs=inputs, backend=backend)
    return cm, inputs


def _nonzero_adapters(*models) -> None:
    """A fresh adapter's B is zero, which would hide a wrong rank path."""
    for cm in models:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in cm.adapter_parameters():
                p.copy_((torch.randn(p.shape, generator=gen) * 0.3).to(p))


def test_a_float16_llama_with_int4_and_lora_on_the_triton_backend_equals_the_eager_backend():
    eager, inputs = _compiled(torch.float16, "eager")
    cm, _ = _compiled(torch.float16, "triton")
    _nonzero_adapters(eager, cm)
    codegen = cm.lowering.codegen
    assert dict(codegen.by_template)["gemm"] == 5  # q/k/v with both LoRA paths, o, gate/up, down, head
    assert not [why for why, _ in codegen.eager if "GEMM" in why]
    with torch.no_grad():
        got, want = cm(**inputs).logits, eager(**inputs).logits
    assert got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_a_bfloat16_llama_on_a_cpu_keeps_its_gemms_eager_and_says_why():
    eager, inputs = _compiled(torch.bfloat16, "eager")
    cm, _ = _compiled(torch.bfloat16, "triton")
    codegen = cm.lowering.codegen
    assert dict(codegen.by_template)["rows"] >= 3  # the norms (and what fuses with them) are kernels
    assert "gemm" not in dict(codegen.by_template)
    assert [n for why, n in codegen.eager if why.startswith(BF16_GEMM_ON_CPU)] == [8]  # 8 GEMM groups
    with torch.no_grad():
        got, want = cm(**inputs).logits, eager(**inputs).logits
    assert got.dtype == torch.bfloat16
    # The interpreter truncates each bfloat16 rounding: within two bfloat16 steps of eager.
    torch.testing.assert_close(got.float(), want.float(), atol=4 * 2 ** -8, rtol=2 * 2 ** -8)


# benchmarks/gpu_check.sh runs this on a lent GPU (with SLIMFX_TRITON_GPU=1: real kernels).
@pytest.mark.skipif(not torch.cuda.is_available(), reason="real Triton kernels need a CUDA GPU (benchmarks/gpu_check.sh runs this there)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_llama_kernels_on_a_gpu_equal_the_eager_backend(dtype):
    eager, inputs = _compiled(dtype, "eager", "cuda")
    cm, _ = _compiled(dtype, "triton", "cuda")
    _nonzero_adapters(eager, cm)
    assert dict(cm.lowering.codegen.by_template)["gemm"] == 5
    with torch.no_grad():
        got, want = cm(**inputs).logits.float(), eager(**inputs).logits.float()
    # float32: IEEE products on both sides (the kernels ask tl.dot for "ieee"; torch's cuBLAS
    # matmuls are not TF32 unless allowed), sums in another order.
    step = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 2 ** -16}[dtype]
    torch.testing.assert_close(got, want, atol=4 * step, rtol=2 * step)
