"""CPU kernels for packed weights (runtime/cpu_kernels.py) and the lowering that uses them
(runtime/lower.py): conversions decode to exactly the reference weights, the kernel ops stay
within bf16 rounding of `slimfx::quant_linear` (and a wrong zero point does not), ineligible
shapes and gradients keep the reference, and artifacts keep the reference graph. Zero points:
packed whole ones (unpacked at conversion) and float ones (fp16) alike."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import slimfx
from slimfx import models
from slimfx.runtime import cpu_kernels as K
from slimfx.runtime.compiled import CompiledModel
from slimfx.runtime.formats import QuantFormat, dequantize, quantize_rtn, unpack, zero_points
from slimfx.runtime.lower import INT4PACK, INT8PACK, QUANT, lower, summary
from slimfx.runtime.ops import apply_quant_linear, quant_linear_args

pytestmark = pytest.mark.skipif(not (K.has_int4pack() and K.has_int8pack()),
                                reason="this torch has no CPU int4pack/int8pack kernels")

# bf16 activations and scales: a linear's output is within ~0.4% of the reference (measured
# 1.5e-3 to 4e-3 on these shapes); one code step of zero-point error is ≥ 10% on the same data.
BF16_REL = 1e-2
BROKEN_REL = 5e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def weight(out: int, inp: int, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """A weight whose groups do not straddle 0 symmetrically when shifted (asym zero points vary)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05 + shift


def args_of(qw, bias=None):
    return (qw.qweight, qw.scales, qw.zeros, bias, *quant_linear_args(qw))


# ---- eligibility -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, group, k, n, expected", [
    (4, 64, 576, 1536, 64),
    (4, 128, 576, 64, 64),     # ragged: 4 groups of 128 and one of 64 -> kernel groups of 64
    (4, 576, 576, 32, 64),     # per-channel: one scale repeated over 9 kernel groups
    (4, 256, 512, 16, 256),
    (4, 32, 96, 48, 32),
    (2, 64, 128, 32, 64),      # int2 codes are int4 codes
    (4, 16, 64, 32, None),     # the kernel has no group below 32
    (4, 32, 100, 32, None),    # 100 = 3 x 32 + 4: the ragged group is no kernel group
    (4, 64, 128, 40, None),    # N must be a multiple of 16
    (8, 64, 128, 32, None),
])
def test_int4_kernel_group(bits, group, k, n, expected):
    assert K.int4_kernel_group(bits, group, k, n) == expected


def test_int8_eligibility():
    assert K.int8_eligible(8, 64, 64) and K.int8_eligible(8, 576, 576)
    assert not K.int8_eligible(8, 40, 40)  # the kernel is wrong unless K % 16 == 0 (32 required)
    assert not K.int8_eligible(8, 64, 128)  # grouped int8: one scale per row only
    assert not K.int8_eligible(4, 64, 64)


# ---- conversion: exact -----------------------------------------------------------------------------

CASES = [  # (bits, group, out, in, zero point: "sym", "int" (packed whole) or "float")
    (4, 64, 48, 192, "sym"),
    (4, 64, 48, 192, "int"),
    (4, 64, 48, 192, "float"),
    (4, 128, 32, 576, "sym"),   # ragged
    (4, 128, 32, 576, "int"),
    (4, 128, 32, 576, "float"),
    (4, None, 16, 320, "int"),  # per-channel
    (2, 64, 32, 128, "sym"),
    (2, 32, 32, 96, "int"),
    (2, 32, 32, 96, "float"),
]


def _fmt(bits, group, kind) -> QuantFormat:
    return QuantFormat(bits, group, kind == "sym", "float" if kind == "float" else "int")


def _qw(bits, group, out, inp, kind, seed=0):
    return quantize_rtn(weight(out, inp, seed, shift=0.0 if kind == "sym" else 0.03), _fmt(bits, group, kind))


def _int4pack(qw):
    bits, group, k = quant_linear_args(qw)
    kg = K.int4_kernel_group(bits, group, k, qw.out_features)
    assert kg is not None
    return (*K.int4pack_weights(qw.qweight, qw.scales, qw.zeros, bits, group, k, kg), kg)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_int4pack_codes_decode_exactly(case):
    """The packed layout holds exactly our codes: scale 1, zero 0 makes the kernel return q - 8,
    which is u - 8 for int4 and u - round(z) for int2 (its codes are moved to centre on 8; the
    rest of a float zero point goes to the kernel's zero)."""
    qw = _qw(*case)
    packed, _, kg = _int4pack(qw)
    k = qw.in_features
    ones = torch.zeros(k // kg, qw.out_features, 2)
    ones[..., 0] = 1
    decoded = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), packed, kg, ones).t()
    codes = unpack(qw.qweight, qw.fmt.bits, k).float()
    if qw.fmt.bits == 4:
        expected = codes - 8
    else:
        group = quant_linear_args(qw)[1]
        z = zero_points(qw.zeros, 2, qw.scales.shape[1])
        z = torch.full_like(qw.scales.float(), 2.0) if z is None else z.round()
        assert bool(((z >= -4) & (z <= 8)).all())  # every int2 zero point here moves whole into the codes
        expected = codes - z.repeat_interleave(group, dim=1)[:, :k]
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_int4pack_scales_and_zeros_decode_the_reference_weight(case):
    """(q - 8) * scale + scale * (8 - z) is the reference (q - z) * scale, up to bf16 scales."""
    qw = _qw(*case)
    packed, sz, kg = _int4pack(qw)
    k = qw.in_features
    w = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), packed, kg, sz.float()).t()
    ref = dequantize(qw)
    # every scale and zero went through bf16 (8 significant bits): ≤ 2^-8 of a weight's group range
    step = (qw.scales.float().abs().amax() * (1 << qw.fmt.bits)).item()
    assert (w - ref).abs().max().item() <= step * 2 ** -8
    assert rel(w, ref) < 4e-3


# ---- the ops: bf16 tolerance, and a tolerance broken code misses ------------------------------------

@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_int4pack_op_is_the_reference_within_bf16(case, bias):
    qw = _qw(*case)
    packed, sz, kg = _int4pack(qw)
    b = torch.randn(qw.out_features) if bias else None
    x = torch.randn(2, 7, qw.in_features)
    with torch.no_grad():
        ref = apply_quant_linear(x, qw, b)
        out = torch.ops.slimfx.quant_linear_int4pack(x, *args_of(qw, b), packed, sz, kg)
        assert out.dtype == x.dtype and out.shape == ref.shape
        assert 0 < rel(out, ref) < BF16_REL
        # a zero point one code off (what a wrong `8 - z` would give) is far outside the tolerance
        wrong = sz.clone()
        wrong[..., 1] += sz[..., 0]
        bad = torch.ops.slimfx.quant_linear_int4pack(x, *args_of(qw, b), packed, wrong, kg)
        assert rel(bad, ref) > BROKEN_REL


@pytest.mark.parametrize("kind", ["sym", "int", "float"])
def test_int8pack_op_is_the_reference_within_bf16(kind):
    sym = kind == "sym"
    qw = quantize_rtn(weight(48, 96, shift=0.0 if sym else 0.03), _fmt(8, None, kind))
    w8, s8, offsets = K.int8pack_weights(qw.qweight, qw.scales, qw.zeros)
    assert (offsets is None) == sym
    b = torch.randn(48)
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        ref = apply_quant_linear(x, qw, b)
        out = torch.ops.slimfx.quant_linear_int8pack(x, *args_of(qw, b), w8, s8, offsets)
        assert 0 < rel(out, ref) < BF16_REL
        if not sym:  # dropping the zero-point term is far off
            bad = torch.ops.slimfx.quant_linear_int8pack(x, *args_of(qw, b), w8, s8, None)
            assert rel(bad, ref) > BROKEN_REL


def test_gradients_take_the_reference():
    """QLoRA: with grad mode on and x requiring grad, the forward is the reference's, exactly,
    and so is the backward; without grad the kernel runs (not bit-identical)."""
    qw = _qw(4, 64, 32, 128, "int")
    packed, sz, kg = _int4pack(qw)
    x = torch.randn(4, 128, requires_grad=True)
    out = torch.ops.slimfx.quant_linear_int4pack(x, *args_of(qw), packed, sz, kg)
    ref = apply_quant_linear(x, qw)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(gx, gref)
    with torch.no_grad():
        assert not torch.equal(torch.ops.slimfx.quant_linear_int4pack(x, *args_of(qw), packed, sz, kg),
                               apply_quant_linear(x, qw))


def test_fake_tensors_trace_through_the_kernel_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qw = _qw(4, 64, 32, 128, "sym")
    packed, sz, kg = _int4pack(qw)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 3, 128))
        with torch.no_grad():
            y = torch.ops.slimfx.quant_linear_int4pack(x, *args_of(qw), packed, sz, kg)
    assert tuple(y.shape) == (2, 3, 32)


# ---- lowering a compiled model ------------------------------------------------------------------------


class Chain(nn.Module):
    """Linears whose shapes and formats take every route."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(576, 32)              # int4 g128 asym, ragged -> int4pack (group 64)
        self.b = nn.Linear(32, 48)               # int4 g32 -> int4pack
        self.c = nn.Linear(48, 40)               # int4 g16 -> reference (no kernel group 16)
        self.d = nn.Linear(40, 64, bias=False)   # int8, K=40 -> reference
        self.e = nn.Linear(64, 64)               # int8 per-channel asym -> int8pack
        self.f = nn.Linear(64, 32)               # int2 g32 float zero points -> int4pack

    def forward(self, x):
        for m in (self.a, self.b, self.c, self.d, self.e):
            x = torch.relu(m(x))
        return self.f(x)


RULES = ["quantize a int4 group=128 sym=false", "quantize b int4 group=32", "quantize c int4 group=16",
         "quantize d int8", "quantize e int8 sym=false", "quantize f int2 group=32 sym=false zero=float"]


@pytest.fixture(scope="module")
def chain():
    m, x = Chain(), torch.randn(2, 9, 576)
    text = "policy p {\n" + "".join(f"    {r}\n" for r in RULES) + "}\n"
    return slimfx.compile(m, text, example_inputs={"x": x}), x


def _routes(cm) -> dict[str, str]:
    return {n.args[1].target.rsplit(".", 1)[0]: {QUANT: "reference", INT4PACK: "int4pack",
                                                   INT8PACK: "int8pack"}[n.target]
            for n in cm.program.graph.nodes if n.target in (QUANT, INT4PACK, INT8PACK)}


def test_lowering_routes_each_linear_and_stays_close(chain):
    cm, x = chain
    cm.set_backend("auto")
    assert _routes(cm) == {"a": "int4pack", "b": "int4pack", "c": "reference", "d": "reference",
                           "e": "int8pack", "f": "int4pack"}
    low = cm.lowering
    assert low.count("int4pack") == 3 and low.count("int8pack") == 1 and low.count("reference") == 2
    assert low.extra_bytes == sum(t.numel() * t.element_size() for n, t in cm.program.named_buffers()
                                  if "pack" in n)
    assert "bf16" in str(low) and "bf16" in repr(cm) and "\n" not in repr(cm)
    with torch.no_grad():
        fast = cm(x)
        cm.set_backend("eager")
        assert _routes(cm) == dict.fromkeys("abcdef", "reference")
        ref = cm(x)
    assert 0 < rel(fast, ref) < 2e-2
    cm.set_backend("auto")


def test_converted_weights_are_not_state_or_weight_bytes(chain):
    cm, _ = chain
    cm.set_backend("eager")
    keys, size = list(cm.state_dict()), cm.weight_bytes()
    assert not any("pack" in n for n, _ in cm.program.named_buffers())
    cm.set_backend("auto")
    assert list(cm.state_dict()) == keys and cm.weight_bytes() == size
    assert cm.lowering.extra_bytes > 0


def test_ineligible_only_model_is_exactly_the_reference():
    m, x = Chain(), torch.randn(2, 3, 576)
    cm = slimfx.compile(m, "policy p {\n    quantize c int4 group=16\n    quantize d int8\n}\n",
                        example_inputs={"x": x})
    assert cm.lowering.lowered == 0 and cm.lowering.count("reference") == 2
    with torch.no_grad():
        out = cm(x)
        cm.set_backend("eager")
        assert torch.equal(out, cm(x))


def test_backends_and_idempotence(chain):
    cm, x = chain
    with pytest.raises(ValueError, match="backend"):
        cm.set_backend("cuda")  # not a backend ("triton" is one: tests/codegen/test_lower.py)
    eager = CompiledModel(cm.graph, report=cm.report, backend="eager")  # shares the graph
    assert eager.lowering.lowered == 0
    first = CompiledModel(cm.graph, report=cm.report)
    n_nodes = len(first.program.graph.nodes)
    again = lower(first.program, "auto")  # nothing added twice
    assert len(first.program.graph.nodes) == n_nodes and again == summary(first.program)
    first.program.graph.lint()


def test_tiny_llama_int4_matches_the_reference(tmp_path):
    lm = models.tiny("llama")
    cm = slimfx.compile(lm, "policy p {\n    quantize blocks.*.** : Linear int4 group=64\n}\n")
    assert cm.lowering.count("int4pack") == 14 and cm.lowering.count("reference") == 0
    x = lm.example_inputs
    with torch.no_grad():
        fast = cm(**x).logits
        cm.set_backend("eager")
        ref = cm(**x).logits
        cm.set_backend("auto")
        assert torch.equal(cm(**x).logits, fast)  # re-lowered: the same kernels again
    assert 0 < rel(fast, ref) < 2e-2

    cm.save(tmp_path / "m")
    assert cm.lowering.count("int4pack") == 14  # saving did not un-lower the live model
    program = (tmp_path / "m" / "program.json").read_text()
    assert "quant_linear_int4pack" not in program and "int4pack" not in program
    assert json.loads(program) and "slimfx.quant_linear" in program
    from safetensors import safe_open
    with safe_open(tmp_path / "m" / "weights.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and not any("pack" in n for n in names)

    back = slimfx.load(tmp_path / "m")
    assert back.lowering.count("int4pack") == 14  # load lowers as "auto"
    with torch.no_grad():
        assert torch.equal(back(**x).logits, fast)
        back.set_backend("eager")
        assert torch.equal(back(**x).logits, ref)


def test_a_plain_call_outside_no_grad_takes_the_kernels_and_load_honours_backend(tmp_path):
    """Compiled weights are frozen, so no gradient is needed and the lowered route runs; load()
    lowers for the backend it is given."""
    import slimfx
    from slimfx.models import tiny

    m = tiny("llama")
    cm = slimfx.compile(m.model, "policy p {\n    quantize blocks.*.** : Linear int4 group=32\n}\n",
                        example_inputs=m.example_inputs)
    assert cm.lowering.lowered > 0 and torch.is_grad_enabled()
    plain = cm(**m.example_inputs).logits
    with torch.no_grad():
        assert torch.equal(plain, cm(**m.example_inputs).logits)
        reference = cm.set_backend("eager")(**m.example_inputs).logits
    assert not torch.equal(plain, reference)  # bf16 activations in the kernel: not the reference bits
    cm.set_backend("auto").save(tmp_path / "a")
    assert slimfx.load(tmp_path / "a", backend="eager").lowering.lowered == 0
    assert slimfx.load(tmp_path / "a").lowering.lowered == cm.lowering.lowered


@pytest.mark.parametrize("fmt", ["int4 group=32", "int8"])
def test_load_state_dict_converts_the_cpu_kernels_weights_again(fmt):
    """load_state_dict copies into qweight/scales in place; the kernels' converted copies (not in
    the state dict) were left from the old weights, so the model ran neither set: wrong logits,
    no error."""
    policy = f"quantize blocks.*.** : Linear {fmt}"
    a, b = (models.tiny("llama", seed=s) for s in (0, 1))
    ca, cb = (slimfx.compile(m.model, policy, example_inputs=m.example_inputs) for m in (a, b))
    assert summary(cb.program).lowered  # the CPU kernels run here, with converted weights
    ids = a.example_inputs["input_ids"]
    with torch.no_grad():
        want = ca(ids).logits
        assert not torch.equal(cb(ids).logits, want)
        cb.load_state_dict(ca.state_dict())
        assert torch.equal(cb(ids).logits, want)
    assert summary(cb.program).lowered == summary(ca.program).lowered
