"""The precision pass: quantize / precision rules rewrite every target linear into
slimfx::quant_linear (or a half-precision cast), agree exactly with dequantize-then-linear,
shrink the bytes as the format says, GPTQ beats RTN on calibration data, the budget solver meets
its budget, and the result saves and loads bit-identically."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimfx

from slimfx.dsl.errors import SpecError
from slimfx.passes.calibrate import observe
from slimfx.passes.capture import capture
from slimfx.passes.precision.gptq import HessianAccumulator, output_error
from slimfx.passes.rewrite import find_sites
from slimfx.runtime.formats import QuantFormat, QuantizedWeight, dequantize

from passes_tiny import captured, example_inputs, state_bytes

QUANT = torch.ops.slimfx.quant_linear.default
LINEARS = "blocks.*.** : Linear"


def policy(*rules: str) -> str:
    return "policy p {\n" + "".join(f"    {r}\n" for r in rules) + "}\n"


def calib(arch: str, n: int = 3) -> list[dict[str, torch.Tensor]]:
    return [example_inputs(arch, batch=2, seq=12, seed=10 + i) for i in range(n)]


@pytest.fixture(scope="module")
def llama():
    """The session's tiny Llama: compile() finds its export in the capture cache."""
    c = captured("llama")
    return c.model, c.inputs


def compile_(model, inputs, *rules, calib=None):
    return slimfx.compile(model, policy(*rules), example_inputs=inputs, calib=calib)


def packed(cm, path: str) -> QuantizedWeight:
    """The packed weight of `path` in a compiled model, read back from its buffers and op node."""
    node = next(n for n in cm.graph.targets[path].nodes if n.target is QUANT)
    bits, group, in_features = node.args[5:8]
    mod = cm.program.get_submodule(path)
    zeros = getattr(mod, "zeros", None)
    return QuantizedWeight(mod.qweight, mod.scales, zeros, QuantFormat(bits, group, zeros is None),
                           (mod.qweight.shape[0], in_features))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---- quantize: structure and exactness -------------------------------------------------------

@pytest.mark.parametrize("fmt, bound", [("int8", 0.02), ("int4 group=32", 0.3), ("int2 group=16", 1.2)])
def test_quantize_rewrites_every_target_and_equals_dequantize_then_linear(llama, fmt, bound):
    model, inputs = llama
    cm = compile_(model, inputs, f"quantize {LINEARS} {fmt}")
    targets = cm.report.rules[0].targets
    assert len(targets) == 14
    for path in targets:
        assert any(n.target is QUANT for n in cm.graph.targets[path].nodes), path
        assert not hasattr(cm.program.get_submodule(path), "weight"), f"{path} still holds its fp weight"
        assert f"{path}.weight" not in {p.name for p in cm.graph.modules[path].params}
    ref = copy.deepcopy(model)  # the original with every target's weight dequantized
    with torch.no_grad():
        for path in targets:
            ref.get_submodule(path).weight.copy_(dequantize(packed(cm, path)))
    expected = capture(ref, inputs)(**inputs).logits
    out = cm(**inputs).logits
    assert torch.equal(out, expected)
    assert rel_error(out, model(**inputs).logits) < bound


def test_ragged_groups_and_asymmetric_on_a_plain_module():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.out = nn.Linear(100, 40), nn.Linear(40, 8, bias=False)

        def forward(self, x):
            return self.out(torch.relu(self.proj(x)))

    torch.manual_seed(0)
    m, x = M(), torch.randn(2, 5, 100)
    cm = compile_(m, {"x": x}, "quantize proj int4 group=32", "quantize out int2 group=16 sym=false")
    assert tuple(cm.program.proj.scales.shape) == (40, 4)  # 100 = 3 x 32 + 4
    assert tuple(cm.program.out.zeros.shape) == (8, 3)  # 40 = 2 x 16 + 8
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.proj.weight.copy_(dequantize(packed(cm, "proj")))
        ref.out.weight.copy_(dequantize(packed(cm, "out")))
    assert torch.equal(cm(x), capture(ref, {"x": x}).module(x)[0])


def test_every_architecture(arch):
    c = captured(arch)
    model, inputs = c.model, c.inputs
    cm = compile_(model, inputs, f"quantize {LINEARS} int4 group=32")
    rule = cm.report.rules[0]
    assert rule.bytes_after < rule.bytes_before
    for path in rule.targets:
        assert any(n.target is QUANT for n in cm.graph.targets[path].nodes), path
    out, ref = cm(**inputs), model(**inputs)
    a, b = (out.logits, ref.logits) if hasattr(ref, "logits") else (out[0], ref[0])
    assert torch.isfinite(a).all() and rel_error(a, b) < 0.5


def test_gpt2_conv1d_transposed_weight_and_tied_head():
    c = captured("gpt2")
    model, inputs = c.model, c.inputs
    cm = compile_(model, inputs, "quantize blocks.*.mlp.c_fc int8", "quantize head int8")
    node = next(n for n in cm.graph.targets["transformer.h.0.mlp.c_fc"].nodes if n.target is QUANT)
    assert node.args[7] == 64 and cm.program.get_submodule("transformer.h.0.mlp.c_fc").qweight.shape == (128, 64)
    head = cm.report.rules[1]
    assert any("tied" in n for n in head.notes)
    assert hasattr(cm.program.lm_head, "weight")  # the embedding still reads it
    assert rel_error(cm(**inputs).logits, model(**inputs).logits) < 0.05


@pytest.mark.parametrize("fmt, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_formats_cast_back_before_the_linear(llama, fmt, dtype):
    model, inputs = llama
    cm = compile_(model, inputs, f"quantize {LINEARS} {fmt}")
    q = cm.program.get_submodule("model.layers.0.self_attn.q_proj")
    assert getattr(q, f"weight_{fmt}").dtype == dtype and not hasattr(q, "weight")
    assert any(n.target is torch.ops.aten._to_copy.default for n in cm.graph.module.graph.nodes)
    assert cm.report.rules[0].details["bits_per_weight"] == 16
    assert rel_error(cm(**inputs).logits, model(**inputs).logits) < 0.02


def test_keep_format_changes_nothing(llama):
    model, inputs = llama
    cm = compile_(model, inputs, f"quantize {LINEARS} keep")
    rule = cm.report.rules[0]
    assert rule.bytes_after == rule.bytes_before and any("full precision" in n for n in rule.notes)
    assert torch.equal(cm(**inputs).logits, capture(model, inputs)(**inputs).logits)


# ---- sizes -----------------------------------------------------------------------------------

def test_int4_g64_bytes_and_bits_per_weight(llama):
    model, inputs = llama
    base = compile_(model, inputs)
    cm = compile_(model, inputs, f"quantize {LINEARS} int4 group=64")
    rule = cm.report.rules[0]
    assert 4.25 <= rule.details["bits_per_weight"] <= 4.5
    weights = rule.details["weights"]
    assert rule.bytes_before - rule.bytes_after == pytest.approx(weights * (4 - 4.25 / 8), abs=1)
    assert base.weight_bytes() - cm.weight_bytes() == rule.bytes_before - rule.bytes_after
    asym = compile_(model, inputs, f"quantize {LINEARS} int4 group=64 sym=false").report.rules[0]
    assert asym.details["bits_per_weight"] == 4.5


# ---- GPTQ and calibration --------------------------------------------------------------------

def test_gptq_output_error_not_above_rtn_on_calibration_inputs(llama):
    model, inputs = llama
    data = calib("llama")
    rules = f"quantize {LINEARS} int4 group=32"
    rtn, gq = compile_(model, inputs, rules, calib=data), compile_(model, inputs, rules + " method=gptq", calib=data)
    graph = capture(model, inputs)
    targets = [graph.targets[p] for p in rtn.report.rules[0].targets]
    H = _hessians(graph, targets, data)
    worse, totals = [], [0.0, 0.0]
    for t in targets:
        w = graph.param(f"{t.path}.weight").detach()
        e_rtn = output_error(w, dequantize(packed(rtn, t.path)), H[t.path].H)
        e_gq = output_error(w, dequantize(packed(gq, t.path)), H[t.path].H)
        totals[0] += e_rtn
        totals[1] += e_gq
        worse += [t.path] if e_gq > e_rtn * (1 + 1e-6) else []
    assert totals[1] < totals[0] and not worse, (totals, worse)
    assert gq.report.rules[0].details["calib_rows"] > 0


def test_gptq_without_calibration_is_a_spec_error(llama):
    model, inputs = llama
    with pytest.raises(SpecError) as e:
        compile_(model, inputs, f"quantize {LINEARS} int4 method=gptq")
    assert e.value.kind == "missing-value" and "calibration" in e.value.message and e.value.line == 2


# ---- the budget solver -----------------------------------------------------------------------

def test_budget_solver_meets_the_budget(llama):
    model, inputs = llama
    cm = compile_(model, inputs, f"precision {LINEARS} choose {{int8, int4 group=32}} budget avg_bits<=6 "
                  "by output_mse", calib=calib("llama"))
    d = cm.report.rules[0].details
    chosen = set(d["choices"].values())
    assert chosen == {"int8 per-channel", "int4 group=32"}  # 6 bits forces a mix
    stored = sum(sum(t.numel() * t.element_size() for t in (q.qweight, q.scales))
                 for q in (packed(cm, p) for p in d["choices"]))
    assert 8 * stored / d["weights"] == pytest.approx(d["achieved_avg_bits"]) and d["achieved_avg_bits"] <= 6


@pytest.mark.parametrize("budget, figure", [("avg_bits<=4.1", "4.25 bits/weight"), ("bytes<=1KiB", "bytes")])
def test_infeasible_budget_names_the_smallest_achievable(llama, budget, figure):
    model, inputs = llama
    with pytest.raises(SpecError) as e:
        compile_(model, inputs, f"precision {LINEARS} choose {{int8, int4 group=64}} budget {budget} by output_mse",
                 calib=calib("llama", 1))
    assert e.value.kind == "out-of-range" and "smallest achievable is" in e.value.message
    assert figure in e.value.message and e.value.line == 2


# ---- artifact and the user's model -----------------------------------------------------------

def test_save_load_bit_identical_with_packed_weights(llama, tmp_path):
    model, inputs = llama
    cm = compile_(model, inputs, f"quantize blocks.*.attn.* int4 group=32 sym=false", f"quantize blocks.*.mlp.* int8")
    cm.save(tmp_path / "m")
    loaded = slimfx.load(tmp_path / "m")
    assert torch.equal(loaded(**inputs).logits, cm(**inputs).logits)
    other = example_inputs("llama", batch=3, seq=9, seed=5)  # dynamic dims survive
    assert torch.equal(loaded(**other).logits, cm(**other).logits)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in cm.state_dict().items()}


def test_user_model_untouched(llama):
    model, inputs = llama
    compile_(model, inputs, f"quantize {LINEARS} int4 method=gptq", calib=calib("llama", 1))
    compile_(model, inputs, f"quantize {LINEARS} fp16")
    assert state_bytes(model) == captured("llama").before


def _hessians(graph, targets, data) -> dict[str, HessianAccumulator]:
    """H = E[x xᵀ] per target, from calibration.observe directly (not the pass's own sharing)."""
    accs, watch = {}, {}
    for t in targets:
        acc = accs[t.path] = HessianAccumulator()
        for site in find_sites(graph, t):
            watch.setdefault(site.x, []).append(acc.add)
    observe(graph, watch, data)
    return accs
