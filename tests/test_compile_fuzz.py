"""compile() on short sequences of real rules drawn at random, on tiny models of several
architectures: it returns a model whose outputs are finite and have the original's shape (fewer
tokens after `restore=false` token steps) and that saves and loads to the same bits, or it raises
a SpecError (never an "internal" one) — never another exception — and the user's model is
unchanged either way.

The rules are written for the tiny models (selectors that resolve, parameters that run in
seconds), so most draws reach the passes and their interplay: a drop after a drop, heals that keep
their adapters, token rules after quantized or adapted blocks, GPTQ on a post-norm encoder. Each
of those once raised something else (fixed with their own tests; found by this test's first runs).
A second test runs the draws on the Triton backend against the reference ops.
"""
from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import slimfx
from slimfx import SpecError
from slimfx.models import tiny

from output_compare import main_output

REMOVE = ["drop blocks[1]", "drop blocks[1:3]", "drop {blocks[0], blocks[2]}", "drop blocks[-1]",
          "drop blocks auto(count=1)", "drop blocks auto(count=2, score=angular, max_run=2)",
          "drop blocks auto(ratio=0.3)", "collapse blocks[0:2]", "collapse blocks[1:4]",
          "collapse blocks auto(count=1, span=2, threshold=0.01)"]  # threshold is in (0, 1]
HEAL = ["heal method=linear", "heal method=linear fold=true", "heal method=lora steps=2",
        "heal method=lora steps=2 merge=false distill=true", "heal method=lora steps=2 rank=2 reach=2 schedule=cosine"]
WEIGHT = ["quantize blocks[0].attn.q int8", "quantize blocks.*.mlp.* int4 group=32",
          "quantize blocks.* int8 method=gptq",
          "quantize head int8", "quantize embed int8", "quantize blocks.*.mlp.* bf16", "quantize blocks.*.attn.v fp16",
          "quantize blocks[1].** : Linear int2 group=16 sym=false zero=float",
          "quantize blocks.*.attn.o int4 group=32 method=gptq act_order=true clip=mse",
          "quantize blocks.*.mlp.* int4 group=16 method=gptq refit=true sym=false zero=float",
          "quantize blocks.* int4 group=16 method=gptq true_sequential=true",
          "precision blocks.*.mlp.* choose {int4, int8} budget avg_bits<=6 by output_mse",
          "precision blocks[0].** : Linear choose {int2 group=16, int8} budget avg_bits<=5 by fisher",
          "precision blocks.*.attn.* choose {int4 group=16, int8} budget avg_bits<=6 by output_mse method=gptq",
          "adapt blocks.*.attn.{q,v} lora rank=2", "adapt blocks[0].attn.q dora rank=2",
          "adapt blocks[-1].mlp.down lora rank=2 merge=true", "adapt blocks.*.attn.q lora rank=2 init=error",
          "adapt blocks[1].attn.k lora rank=2 dtype=bf16", "adapt blocks[-2:].mlp.* dora rank=2 dtype=fp16",
          "adapt blocks.*.attn.o lora rank=2 init=gaussian dropout=0.1",
          "keep blocks[0]", "keep blocks.*.attn.q"]
TOKENS = ["tokens unpad", "tokens after blocks[0] merge ratio=0.25", "tokens after blocks[0] prune keep=0.5",
          "tokens after blocks[0] merge by=keys prop_attn=true restore=true",
          "tokens after blocks[1:3] merge ratio=0.2 protect=none", "tokens after blocks[1] prune keep=0.6 score=norm",
          "tokens after {blocks[0], blocks[2]} merge ratio=0.3"]
ARCHS = ("llama", "qwen3", "gpt2", "opt", "bert")
_MODELS: dict[str, object] = {}


def _model(arch: str):
    if arch not in _MODELS:
        _MODELS[arch] = tiny(arch, layers=5)
    return _MODELS[arch]


@st.composite
def rule_sequences(draw) -> str:
    """Removals and heals first (as the language wants them), then weight rules, then token rules;
    one draw in ten shuffled, for the order checks."""
    rules = []
    if draw(st.booleans()):
        rules += draw(st.lists(st.sampled_from(REMOVE), min_size=1, max_size=2, unique=True))
        rules += draw(st.lists(st.sampled_from(HEAL), max_size=2))
    rules += draw(st.lists(st.sampled_from(WEIGHT), max_size=3, unique=True))
    if draw(st.booleans()):
        rules += draw(st.lists(st.sampled_from(TOKENS), max_size=2, unique=True))
    if draw(st.integers(0, 9)) == 0:
        rules = draw(st.permutations(rules))
    return "\n".join(rules)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(rules=rule_sequences(), arch=st.sampled_from(ARCHS))
def test_compile_gives_a_working_model_or_a_spec_error(rules, arch):
    lm = _model(arch)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    try:
        cm = slimfx.compile(lm, rules)
    except SpecError as e:
        assert all(d.kind != "internal" for d in e.diagnostics), str(e)
        str(e)  # rendering must not fail either
    else:
        with torch.no_grad():
            got, want = main_output(cm(**lm.example_inputs)), main_output(lm.model(**lm.example_inputs))
        assert torch.isfinite(got).all(), rules
        if "tokens after" in rules and "restore=true" not in rules:  # restore=false: fewer tokens come out
            assert got.shape[0] == want.shape[0] and got.shape[2:] == want.shape[2:], rules
            assert got.shape[1] <= want.shape[1], rules
        else:
            assert got.shape == want.shape, rules
        with tempfile.TemporaryDirectory() as folder:
            cm.save(f"{folder}/m")
            with torch.no_grad():
                back = main_output(slimfx.load(f"{folder}/m")(**lm.example_inputs))
        assert torch.equal(back, got), f"save/load changed the outputs of {rules!r}"
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), f"compile changed the user's model: {rules!r}"


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(rules=rule_sequences(), arch=st.sampled_from(("llama", "gpt2", "opt", "bert")))
def test_what_compiles_runs_on_the_triton_backend_as_on_the_reference_ops(rules, arch):
    """The same draws with backend="triton" (Triton's interpreter here): the generated kernels
    give what the reference ops give, to float32 rounding."""
    # BERT's blocks end in a LayerNorm of weight 1 here: every token's norm is √d, and which tokens
    # a prune by norm keeps is decided by rounding, which the kernels do in another order than the
    # reference ops (3.95 apart; with keep=1.0 the two agree to 1e-6). Such a draw cannot tell a kernel's error.
    assume(not (arch == "bert" and "score=norm" in rules))
    lm = _model(arch)
    try:
        cm = slimfx.compile(lm, rules, backend="triton")
    except SpecError:
        return
    with torch.no_grad():
        kernels = main_output(cm(**lm.example_inputs))
        cm.set_backend("eager")
        reference = main_output(cm(**lm.example_inputs))
    torch.testing.assert_close(kernels, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rules", [
    "drop blocks[2:4]\ndrop blocks[1:3]\nheal method=lora steps=2",
    "quantize blocks[0].attn.q int8\nquantize blocks[1].attn.q int4\ntokens unpad",
    "quantize blocks.* int8 method=gptq",
])
def test_the_draws_that_found_bugs_stay_fixed(rules):
    """Kept as plain cases: the random draw may not come back to them."""
    lm = _model("bert" if "gptq" in rules else "llama")
    cm = slimfx.compile(lm, rules)
    with torch.no_grad():
        assert torch.isfinite(main_output(cm(**lm.example_inputs))).all()


def test_two_token_steps_after_one_block_are_refused_at_the_second_rule():
    with pytest.raises(SpecError) as e:
        slimfx.compile(_model("bert"), "tokens after blocks[0] merge\ntokens after {blocks[0], blocks[2]} merge")
    assert e.value.diagnostics[0].kind == "duplicate" and e.value.diagnostics[0].line == 2
