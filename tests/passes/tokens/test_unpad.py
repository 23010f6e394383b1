"""`tokens unpad` on every tiny architecture with a sequence: outputs at real positions equal the
original model's on random padding patterns (left and right), zeros at padding, a batch without
padding bit-identical, save/load bit-identical with other batch sizes and lengths; bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import slimfx
from slimfx.models import TINY_ARCHS, tiny

from output_compare import main_output

POLICY = "policy p {\n    tokens unpad\n}\n"
ARCHS = [a for a in TINY_ARCHS if a != "vit"]


def _inputs(batch: int, seq: int, lengths, left: bool, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (batch, seq), generator=gen)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, seq - n:] = 1 if left else 0
        if not left:
            mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


_COMPILED: dict[str, tuple] = {}


def _compiled(arch: str):
    if arch not in _COMPILED:
        lm = tiny(arch, layers=2)
        example = _inputs(3, 7, [7, 4, 2], left=False)
        _COMPILED[arch] = lm, slimfx.compile(lm.model, POLICY, example_inputs=example, calib=[example])
    return _COMPILED[arch]


@st.composite
def padded_batches(draw):
    batch, seq = draw(st.integers(1, 4)), draw(st.integers(2, 12))
    lengths = draw(st.lists(st.integers(0, seq), min_size=batch, max_size=batch))  # 0: a row of padding
    return _inputs(batch, seq, lengths, draw(st.booleans()), draw(st.integers(0, 1000)))


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=padded_batches())
def test_unpad_is_exact_at_real_positions_and_zero_at_padding(arch, batch):
    lm, cm = _compiled(arch)
    with torch.no_grad():
        want, got = main_output(lm.model(**batch)), main_output(cm(**batch))
    real = batch["attention_mask"].bool()
    assert got.shape == want.shape
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    assert got[~real].abs().sum() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_a_batch_of_padding_only_gives_zeros(arch):
    """No real token at all: a packed view [1, 0, -1, 16] could not infer its -1 (a raw
    RuntimeError on every architecture)."""
    lm, cm = _compiled(arch)
    batch = _inputs(2, 6, [0, 0], left=False)
    with torch.no_grad():
        want, got = main_output(lm.model(**batch)), main_output(cm(**batch))
    assert got.shape == want.shape and got.abs().sum() == 0


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_a_batch_without_padding_is_bit_identical(arch):
    lm, cm = _compiled(arch)
    batch = _inputs(3, 9, [9, 9, 9], left=False, seed=5)
    with torch.no_grad():
        assert torch.equal(main_output(cm(**batch)), main_output(lm.model(**batch)))


def test_the_report_counts_real_tokens_and_attention_per_sequence():
    _, cm = _compiled("llama")
    (rule,) = cm.report.rules
    assert rule.details["tokens_real"] == 13 and rule.details["tokens_padded"] == 21
    assert rule.details["attention_per_sequence"] == 2  # one per block
    assert rule.details["padded_layout_nodes"] == 0


def test_the_report_says_when_its_batch_has_no_padding_to_remove():
    """The demo's note timed a full calibration batch (512 of 512 tokens real) and read as if
    unpad slowed the model down for nothing."""
    (padded,) = _compiled("llama")[1].report.rules
    assert not any("packing's cost alone" in n for n in padded.notes)
    lm = tiny("llama")
    full = _inputs(2, 6, [6, 6], left=False)
    (rule,) = slimfx.compile(lm.model, POLICY, example_inputs=full, calib=[full]).report.rules
    assert any("12 of 12 tokens are real (100%)" in n and "with no padding to remove this is the packing's cost "
               "alone" in n for n in rule.notes), rule.notes


def test_the_report_estimates_the_blocks_flops_before_and_after():
    """tiny bert: 2 blocks of width 64, linears 4·64·64 + 2·64·128 = 32,768 weights; the example
    batch has 7 + 4 + 2 real tokens in a 3×7 grid. FLOPs per block: 2·tokens·weights + 4·ΣL²·64."""
    _, cm = _compiled("bert")
    (rule,) = cm.report.rules
    per_block_before = 2 * 21 * 32768 + 4 * (3 * 49) * 64
    per_block_after = 2 * 13 * 32768 + 4 * (49 + 16 + 4) * 64
    assert rule.details["flops_before"] == 2 * per_block_before
    assert rule.details["flops_after"] == 2 * per_block_after


def test_hand_written_attention_runs_padded_and_stays_exact():
    """gemma2 computes attention with matmul + softmax: those ops get the padded layout back."""
    lm, cm = _compiled("gemma2")
    (rule,) = cm.report.rules
    assert rule.details["attention_per_sequence"] == 0 and rule.details["padded_layout_nodes"] > 0
    assert any("padded layout" in n for n in rule.notes)


def test_heads_folded_into_the_batch_run_padded_and_stay_exact():
    """DeBERTa-v2 reshapes q/k/v to [B·H, S, d] (heads in the batch dim): that view cannot take
    packed tokens, and was left with the packed count N for S when it fell back to the padded
    layout (every call failed: "shape '[-1, 15, 16]' is invalid")."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, type_vocab_size=0)
    model = transformers.DebertaV2Model(cfg).eval()
    cm = slimfx.compile(model, POLICY, example_inputs=_inputs(2, 9, [9, 6], left=False))
    for batch in (_inputs(3, 7, [7, 4, 2], left=False, seed=1), _inputs(2, 5, [5, 5], left=False, seed=2)):
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            want, got = model(**batch).last_hidden_state, cm(**batch).last_hidden_state
        torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    assert cm.report.rules[0].details["padded_layout_nodes"] > 0


class _KeyPaddingAttention(torch.nn.Module):
    """Hand-written attention whose mask is [B, 1, 1, S]: one row of key padding for every query."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x, mask):
        B, S, D = x.shape
        q, k, v = (t.view(B, S, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return x + self.out(y.transpose(1, 2).reshape(B, S, D))


class _KeyPaddingEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(200, 16)
        self.layers = torch.nn.ModuleList(_KeyPaddingAttention() for _ in range(2))

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x


def test_a_key_padding_mask_that_broadcasts_over_queries_stays_exact():
    """A [B, 1, 1, S] mask has no query rows to select per sequence: every call raised "INDICES
    element is out of DATA bounds" (token_ops._mask_of)."""
    torch.manual_seed(0)
    model = _KeyPaddingEncoder().eval()
    cm = slimfx.compile(model, POLICY, example_inputs=_inputs(2, 8, [8, 5], left=False))
    for batch in (_inputs(3, 7, [7, 4, 2], left=False, seed=1), _inputs(2, 6, [3, 6], left=True, seed=2)):
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            want, got = model(**batch), cm(**batch)
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
        assert got[~real].abs().sum() == 0


def test_save_load_is_bit_identical_with_other_shapes(tmp_path):
    lm, cm = _compiled("bert")
    cm.save(tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    for batch in (_inputs(5, 11, [11, 3, 6, 1, 9], left=False, seed=1), _inputs(1, 4, [2], left=True, seed=2)):
        with torch.no_grad():
            assert torch.equal(main_output(back(**batch)), main_output(cm(**batch)))


def test_the_rewritten_graph_re_exports_with_its_data_dependent_length():
    """The packed length is an unbacked size: torch.export of the compiled graph still works, and
    the re-exported program gives the same bits on other shapes."""
    _, cm = _compiled("bert")
    gm = cm.graph.module
    batch = _inputs(3, 9, [9, 5, 2], left=False)
    dim = torch.export.Dim.AUTO
    program = torch.export.export(gm, (batch["input_ids"], batch["attention_mask"]),
                                  dynamic_shapes=({0: dim, 1: dim}, {0: dim, 1: dim}), strict=False)
    other = _inputs(4, 6, [6, 1, 3, 5], left=False, seed=9)
    with torch.no_grad():
        got = program.module()(other["input_ids"], other["attention_mask"])
        want = gm(other["input_ids"], other["attention_mask"])
    assert torch.equal(got[0], want[0])


def test_the_users_model_is_not_touched():
    lm = tiny("llama", layers=1)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    example = _inputs(2, 5, [5, 3], left=False)
    slimfx.compile(lm.model, POLICY, example_inputs=example, calib=[example])
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_captured_without_a_mask_is_refused():
    lm = tiny("llama", layers=1)
    with pytest.raises(slimfx.SpecError, match="attention_mask") as e:
        slimfx.compile(lm.model, POLICY, example_inputs={"input_ids": torch.randint(3, 200, (2, 5))})
    assert "line 2" in str(e.value) or "2:" in str(e.value)
    assert "pass `attention_mask` among the example inputs" in e.value.hint


def test_a_model_without_a_sequence_is_refused():
    """A ViT takes no mask: the hint used to say to pass one, which its forward cannot take."""
    lm = tiny("vit", layers=1)
    with pytest.raises(slimfx.SpecError, match="attention_mask") as e:
        slimfx.compile(lm.model, POLICY, example_inputs=lm.example_inputs)
    assert "takes no token ids, so its inputs have no padding to remove" in e.value.hint


def test_a_mask_under_another_name_is_refused_saying_which_name_is_read():
    class MaskNamedMask(_KeyPaddingEncoder):
        def forward(self, input_ids, mask):
            return super().forward(input_ids, mask)

    example = _inputs(2, 5, [5, 3], left=False)
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.compile(MaskNamedMask().eval(), POLICY,
                       example_inputs={"input_ids": example["input_ids"], "mask": example["attention_mask"]})
    assert "this model's mask is `mask`" in e.value.hint and "name that argument of forward" in e.value.hint


def test_unpad_then_int8_matches_int8_alone_at_real_positions():
    lm = tiny("llama", layers=2)
    example = _inputs(3, 7, [7, 4, 2], left=True)
    rules = "quantize blocks.*.** : Linear int8"
    both = slimfx.compile(lm.model, "tokens unpad\n" + rules, example_inputs=example, calib=[example])
    alone = slimfx.compile(lm.model, rules, example_inputs=example, calib=[example])
    real = example["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(main_output(both(**example))[real], main_output(alone(**example))[real],
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "bert"])
def test_blocks_can_be_removed_after_unpad(arch):
    """Rotary models raised "unsqueeze_18 is computed inside model.layers.1 and read after it": the
    packed cos/sin of a block sat outside every block. Each removal equals the same rule without
    unpad at real positions."""
    lm = tiny(arch, layers=3)
    example = _inputs(3, 7, [7, 4, 2], left=True)
    real = example["attention_mask"].bool()
    for rules in ("drop blocks[1]", "drop blocks[0]", "collapse blocks[0:2]"):
        both = slimfx.compile(lm.model, "tokens unpad\n" + rules, example_inputs=example, calib=[example])
        alone = slimfx.compile(lm.model, rules, example_inputs=example, calib=[example])
        with torch.no_grad():
            torch.testing.assert_close(main_output(both(**example))[real], main_output(alone(**example))[real],
                                       atol=2e-5, rtol=1e-4)


def test_unpad_after_rules_that_rewrote_only_some_blocks():
    """A quantized or adapted linear in one block holds other tensors than the same linear in the
    next; the blocks are still the blocks, so a token rule after such rules finds them (it was
    refused with "has no repeated blocks") and stays exact at real positions."""
    lm = tiny("bert", layers=3)
    example = _inputs(3, 7, [7, 4, 2], left=False)
    rules = "quantize blocks[0].attn.q int8\nquantize blocks[1].attn.q int4\nadapt blocks[2].attn.k lora rank=2"
    both = slimfx.compile(lm.model, rules + "\ntokens unpad", example_inputs=example, calib=[example])
    alone = slimfx.compile(lm.model, rules, example_inputs=example, calib=[example])
    assert [b.path for b in both.graph.blocks] == [f"encoder.layer.{i}" for i in range(3)]
    real = example["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(main_output(both(**example))[real], main_output(alone(**example))[real],
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_the_flops_estimate_counts_quantized_linears_by_their_logical_shape(arch):
    """`quantize` above `tokens unpad`: a quantized linear (slimfx::quant_linear) runs on the
    packed tokens like a float one (it was scattered back to the padded layout), the outputs at
    real positions are the quantized model's, and the FLOPs estimate counts its logical shape, as
    for the float model (it raised IndexError on Llama and counted BERT's bias as the weight)."""
    lm = tiny(arch, layers=2)
    example = _inputs(3, 7, [7, 4, 2], left=False)
    plain = slimfx.compile(lm.model, POLICY, example_inputs=example, calib=[example])
    rules = "quantize blocks[1].** : Linear int8\nquantize blocks[0].mlp.down fp16\ntokens unpad"
    quantized = slimfx.compile(lm.model, rules, example_inputs=example, calib=[example])
    want, got = plain.report.rules[0].details, quantized.report.rules[-1].details
    assert (got["flops_before"], got["flops_after"]) == (want["flops_before"], want["flops_after"])
    for key in ("padded_layout_nodes", "attention_per_sequence", "packed_nodes"):  # BERT's pooler reads padded
        assert got[key] == want[key], key
    alone = slimfx.compile(lm.model, rules.rpartition("\n")[0], example_inputs=example, calib=[example])
    real = example["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(main_output(quantized(**example))[real], main_output(alone(**example))[real],
                                   atol=2e-5, rtol=1e-4)
