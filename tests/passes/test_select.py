"""resolve(): every selector form, canonical and raw names, and the errors for no match."""
from __future__ import annotations

import pytest

from passes_tiny import EXPECTED, captured, one_of
from slimfx.dsl.ast import (Alternatives, GlobStar, Item, Name, Path, Selector, Slice, Span,
                            Star)
from slimfx.dsl.errors import SpecError
from slimfx.passes.graph import Block, Target
from slimfx.passes.select import resolve

# ---- building selectors by hand: "blocks[0:2].attn.{q,v}" ------------------------------------


def sel(*segments, cls: str | None = None, span: Span | None = None) -> Selector:
    segs = tuple(_seg(s) for s in segments)
    return Selector(Path(segs), cls, span or Span(3, 14, 3, 14 + 10))


def _seg(s):
    if not isinstance(s, str):
        return s
    if s == "*":
        return Star()
    if s == "**":
        return GlobStar()
    return Name(s)


def alt(*options: str) -> Alternatives:
    return Alternatives(tuple(Path(tuple(_seg(p) for p in o.split("."))) for o in options))


def paths(graph, selector) -> list[str]:
    return [r.path for r in resolve(graph, selector)]


@pytest.fixture(scope="module")
def llama():
    return captured("llama").graph


# ---- per architecture ------------------------------------------------------------------------


def test_attn_q_and_mlp_down_per_arch(arch):
    g = captured(arch).graph
    _, q, down, embed, head, _ = EXPECTED[arch]
    n = len(g.blocks)
    got = paths(g, sel("blocks", "*", "mlp", "down"))
    assert len(got) == n and one_of(down, got[0])
    if q.startswith("fused:"):
        with pytest.raises(SpecError) as info:
            resolve(g, sel("blocks", "*", "attn", "q"))
        assert info.value.kind == "selector" and "`attn.qkv`" in info.value.hint
        assert q.removeprefix("fused:") in info.value.message and "fused" in info.value.message
        assert one_of(q.removeprefix("fused:"), paths(g, sel("blocks", "*", "attn", "qkv"))[0])
    else:
        got = paths(g, sel("blocks", "*", "attn", "q"))
        assert len(got) == n and one_of(q, got[0])
    assert paths(g, sel("embed")) == [embed]
    if head is None:
        with pytest.raises(SpecError, match="has no head"):
            resolve(g, sel("head"))
    else:
        assert one_of(head, paths(g, sel("head"))[0])
    for check in ARCH_CHECKS.get(arch, ()):
        check(captured(arch))


# ---- forms -----------------------------------------------------------------------------------


def test_dotted_raw_path(llama):
    assert paths(llama, sel("model", "layers", "1", "self_attn", "q_proj")) == [
        "model.layers.1.self_attn.q_proj"]


def test_bracket_index_equals_dotted_index(llama):
    bracket = sel("model", Name("layers", Item(1)), "self_attn", "q_proj")
    assert paths(llama, bracket) == paths(llama, sel("model", "layers", "1", "self_attn", "q_proj"))


def test_star_is_exactly_one_level(llama):
    assert paths(llama, sel("model", "layers", "0", "mlp", "*")) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj"]
    with pytest.raises(SpecError, match="no `q_proj` under `model.layers.\\*`"):
        resolve(llama, sel("model", "layers", "*", "q_proj"))  # q_proj is two levels down


def test_globstar_includes_zero_levels(llama):
    assert paths(llama, sel("**", "lm_head")) == ["lm_head"]
    everything = paths(llama, sel("**"))
    assert everything[0] == "model.embed_tokens" and "lm_head" in everything


def test_globstar_class_filter_every_linear_in_every_block(llama):
    got = resolve(llama, sel("blocks", "*", "**", cls="Linear"))
    assert len(got) == 2 * 7 and all(isinstance(t, Target) and t.kind == "linear" for t in got)
    assert "lm_head" not in [t.path for t in got]


def _linear_filter_matches_gpt2_conv1d(c):
    g = c.graph
    got = paths(g, sel("blocks", "*", "**", cls="Linear"))
    assert got[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                       "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


def test_class_filter_by_mro_and_exact_class(llama):
    assert len(paths(llama, sel("**", cls="LlamaRMSNorm"))) == 5
    assert len(paths(llama, sel("**", cls="Module"))) == len(llama.targets) + 2  # + the blocks
    assert [b.index for b in resolve(llama, sel("**", cls="LlamaDecoderLayer"))] == [0, 1]


def test_alternatives_with_sub_paths(llama):
    got = paths(llama, sel("blocks", "0", alt("attn.q", "mlp.down")))
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def test_blocks_slice_with_roles(llama):
    got = paths(llama, sel(Name("blocks", Slice(0, 2)), "attn", alt("q", "v")))
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                   "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("index, want", [
    (Item(0), [0]), (Item(-1), [1]), (Item(-2), [0]), (Slice(None, None), [0, 1]),
    (Slice(-1, None), [1]), (Slice(None, None, -1), [0, 1]), (Slice(1, None), [1]),
    (Slice(0, 2), [0, 1]), (Slice(None, None, 2), [0]),  # Slice(0, 100) is refused: not cut short
])
def test_block_index_and_slice_semantics(llama, index, want):
    got = resolve(llama, sel(Name("blocks", index)))
    assert all(isinstance(b, Block) for b in got)
    assert [b.index for b in got] == want


def test_blocks_star_and_raw_container_give_blocks(llama):
    assert [b.index for b in resolve(llama, sel("blocks", "*"))] == [0, 1]
    assert [b.index for b in resolve(llama, sel("blocks"))] == [0, 1]
    assert [b.index for b in resolve(llama, sel("model", "layers"))] == [0, 1]


def test_mixed_canonical_then_raw(llama):
    assert paths(llama, sel("blocks", "*", "self_attn", "q_proj")) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_module_that_is_no_target_expands_to_its_targets(llama):
    assert paths(llama, sel("blocks", "0", "self_attn")) == [
        f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]


def test_role_group_and_block_norms(llama):
    assert paths(llama, sel(Name("blocks", Item(0)), "mlp")) == [
        f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert paths(llama, sel(Name("blocks", Item(1)), "norm")) == [
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"]
    assert paths(llama, sel("final_norm")) == ["model.norm"]


def test_results_deduplicated_in_model_order(llama):
    got = paths(llama, sel("blocks", "*", alt("mlp.down", "attn.q", "self_attn.q_proj", "**")))
    assert len(got) == len(set(got))
    order = [t.path for t in llama.targets.values() if t.block is not None]
    blocks = ["model.layers.0", "model.layers.1"]
    assert [p for p in got if p not in blocks] == order


def _fused_gate_up(c):
    g = c.graph
    with pytest.raises(SpecError, match="gate_up"):
        resolve(g, sel("blocks", "*", "mlp", "up"))
    assert paths(g, sel("blocks", "0", "mlp", "gate_up")) == ["model.layers.0.mlp.gate_up_proj"]


# Checks of one architecture's peculiarity, run inside its per-arch test.
ARCH_CHECKS = {"gpt2": (_linear_filter_matches_gpt2_conv1d,), "phi3": (_fused_gate_up,)}


# ---- errors ----------------------------------------------------------------------------------


def test_no_match_names_closest_and_position(llama):
    source = "policy p {\n    x\n  quantize blocks.*.self_atn.q_proj int8\n}\n"
    selector = sel("blocks", "*", "self_atn", "q_proj", span=Span(3, 12, 3, 37))
    with pytest.raises(SpecError) as info:
        resolve(llama, selector, source=source, filename="p.slim")
    err = info.value
    assert err.kind == "selector" and (err.line, err.column) == (3, 12)
    assert "`self_atn`" in err.message and "`self_attn`" in err.message
    assert "under `blocks.*`" in err.message
    assert "did you mean" in err.hint
    rendered = str(err)
    assert rendered.startswith("p.slim:3:12: error[selector]")
    assert "quantize blocks.*.self_atn.q_proj int8" in rendered and "^" * 25 in rendered


def test_no_match_at_top_level_lists_names(llama):
    with pytest.raises(SpecError) as info:
        resolve(llama, sel("modle", "layers"))
    assert "at the top of LlamaForCausalLM" in info.value.message
    assert "`model`" in info.value.message


def test_unknown_role_lists_roles(llama):
    with pytest.raises(SpecError) as info:
        resolve(llama, sel("blocks", "0", "attn", "qq"))
    assert "`q`" in info.value.message and "under `blocks.0.attn`" in info.value.message


def test_index_out_of_range_names_valid_range(llama):
    with pytest.raises(SpecError) as info:
        resolve(llama, sel(Name("blocks", Item(5))))
    assert "out of range" in info.value.message and "-2..1" in info.value.message


@pytest.mark.parametrize("fused, written, separate", [
    ("qkv", "attn.{q,k,v}", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                             "model.layers.0.self_attn.v_proj"]),
    ("gate_up", "mlp.{gate,up}", ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]),
])
def test_a_fused_role_on_separate_projections_names_them(llama, fused, written, separate):
    """`attn.qkv` on Llama said only "closest: `v`, `q`, `k`"; the other way round (`attn.q` on
    GPT-2) already named the fused linear."""
    with pytest.raises(SpecError) as info:
        resolve(llama, sel("blocks", "*", "attn" if fused == "qkv" else "mlp", fused))
    assert f"has no fused `{'attn' if fused == 'qkv' else 'mlp'}.{fused}`" in info.value.message
    assert all(f"`{p}`" in info.value.message for p in separate)
    assert info.value.hint == f"select `{written}` for all of them"
    part = written[written.index("{") + 1:].split(",")[0]
    assert paths(llama, sel("blocks", "0", written.split(".")[0], part))  # which the hint's selector reaches


def test_empty_slice_is_an_error(llama):
    with pytest.raises(SpecError, match=r"slice \[2:\] of `blocks` is empty.*2 items"):
        resolve(llama, sel(Name("blocks", Slice(2, None))))


@pytest.mark.parametrize("written, bound, shorter", [
    (Slice(1, 5), "its stop 5 is past the 2 items `blocks` has (bounds -2..2)", "blocks[1:]"),
    (Slice(-4, -1), "its start -4 is past the 2 items `blocks` has (bounds -2..2)", "blocks[:-1]"),
    (Slice(5, None), "its start 5 is past the 2 items `blocks` has (bounds -2..2)", "blocks[:]"),
    (Slice(1, -4, -1), "its stop -4 is past the 2 items `blocks` has (bounds -3..1)", "blocks[1::-1]"),
    # a backward start one past the last item (it was cut to blocks[1::-1] by a mutant no test saw)
    (Slice(2, None, -1), "its start 2 is past the 2 items `blocks` has (bounds -2..1)", "blocks[::-1]"),
])
def test_a_slice_reaching_past_the_blocks_is_an_error_not_cut_short(llama, written, bound, shorter):
    """Python's slices clamp: `drop blocks[20:28]` written for a deeper model removed what exists
    of the range, silently."""
    with pytest.raises(SpecError) as info:
        resolve(llama, sel(Name("blocks", written)))
    assert bound in info.value.message and f"`{shorter}`" in info.value.hint


@pytest.mark.parametrize("written, indices", [(Slice(-2, 2), [0, 1]), (Slice(1, -3, -1), [0, 1]),
                                              (Slice(1, -2, -1), [1]), (Slice(0, 2, 2), [0])])
def test_slices_within_the_blocks_keep_python_meaning(llama, written, indices):
    """Bounds up to the ends, stepping backwards too (-3 on 2 items reaches past index 0); the
    selection comes in model order."""
    assert paths(llama, sel(Name("blocks", written))) == [f"model.layers.{i}" for i in indices]


def test_zero_step_is_an_error(llama):
    with pytest.raises(SpecError, match="step"):
        resolve(llama, sel(Name("blocks", Slice(None, None, 0))))


def test_index_on_a_non_list(llama):
    with pytest.raises(SpecError, match="LlamaAttention, not a ModuleList"):
        resolve(llama, sel("blocks", "0", Name("self_attn", Item(0))))


def test_class_filter_matching_nothing(llama):
    with pytest.raises(SpecError) as info:
        resolve(llama, sel("blocks", "*", "**", cls="Linaer"))
    assert "none is a `Linaer`" in info.value.message and "`Linear`" in info.value.hint


def test_a_class_filter_on_a_block_points_inside_it(llama):
    """The hint to `blocks[0] : Linear` was "did you mean `Linear`?", the very word written."""
    with pytest.raises(SpecError) as info:
        resolve(llama, sel(Name("blocks", Item(0)), cls="Linear"))
    assert info.value.hint == ("`: Linear` filters the matched modules themselves; for the Linear modules inside "
                               "them write `blocks[0].** : Linear`")


def test_module_without_targets(llama):
    with pytest.raises(SpecError, match="none of them is a linear"):
        resolve(llama, sel("model", "rotary_emb"))


def test_star_under_a_leaf(llama):
    with pytest.raises(SpecError, match="nothing under `lm_head`"):
        resolve(llama, sel("lm_head", "*"))


def test_alternative_option_matching_nothing_is_an_error(llama):
    with pytest.raises(SpecError, match="no `x`"):
        resolve(llama, sel("blocks", "0", alt("attn.q", "x")))


def test_class_filter_hint_names_each_class_once(llama):
    """`Linear` is among the classes and was added again for the hint: "did you mean `Linear` or `Linear`?"."""
    with pytest.raises(SpecError) as info:
        resolve(llama, sel("blocks", "*", "**", cls="linear"))
    assert info.value.hint == "did you mean `Linear`?"


def test_a_top_level_sequential_says_how_to_select_its_numbered_children():
    """Its names were listed (`0`, `1`, `2`) though no selector can start with one."""
    import torch

    import slimfx

    seq = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.raises(slimfx.SpecError, match=r"(?s)names there: `0`, `1`, `2`.*cannot start a selector.*`\* : Linear`"):
        slimfx.compile(seq, "quantize foo int8", example_inputs={"input": torch.randn(2, 8)})
    cm = slimfx.compile(seq, "quantize * : Linear int8", example_inputs={"input": torch.randn(2, 8)})
    assert cm.report.rules[0].targets == ('0', '2')


@pytest.mark.parametrize("rules, said", [
    ("drop blocks[0]\nquantize blocks[1].attn.q int8",
     "index 1 is out of range: `blocks` has 1 item (valid -1..0); the rules above removed 1 of the model's 2 blocks"),
    ("drop blocks auto(count=1)\nkeep blocks[1]",
     "index 1 is out of range: `blocks` has 1 item (valid -1..0); the rules above removed 1 of the model's 2 blocks"),
    ("drop blocks[0]\nquantize blocks[0:2].attn.q int8",
     "its stop 2 is past the 1 item `blocks` has (bounds -1..1); the rules above removed 1 of the model's 2 blocks"),
])
def test_an_index_past_the_blocks_a_removal_left_says_the_rules_above_renumbered_them(rules, said):
    """It said "`blocks` has 1 items (valid -1..0)" on a model of two blocks, with no word of the
    `drop` above that renumbered them (README: rules after a removal see the blocks left)."""
    import slimfx
    from slimfx.models import tiny

    with pytest.raises(SpecError) as info:
        slimfx.plan(tiny("llama"), rules)
    assert said in info.value.message and info.value.line == 2
    assert info.value.hint.startswith("blocks are renumbered after a `drop` or `collapse`")


@pytest.mark.parametrize("rules, said", [
    ("keep blocks[5]", "index 5 is out of range: `blocks` has 2 items (valid -2..1)"),
    # past the model's own two blocks too: moving the rule above the removal would not help
    ("drop blocks[0]\nkeep blocks[7]", "index 7 is out of range: `blocks` has 1 item (valid -1..0)"),
    ("drop blocks[0]\nkeep blocks[0:5]", "slice [0:5] of `blocks` reaches outside it: its stop 5 is past the 1 item "
                                         "`blocks` has (bounds -1..1); a slice is not cut short to fit"),
])
def test_an_index_the_model_never_had_says_nothing_of_removals(rules, said):
    import slimfx
    from slimfx.models import tiny

    with pytest.raises(SpecError) as info:
        slimfx.plan(tiny("llama"), rules)
    assert info.value.message == said
    assert info.value.hint is None or "renumbered" not in info.value.hint


def test_t5_decoder_blocks_have_their_mlp():
    """A T5 decoder block keeps its MLP at layer.2 (layer.1 is the cross-attention): `blocks.*.mlp`
    found nothing there."""
    import torch
    import transformers as T

    import slimfx

    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                                    num_heads=4, decoder_start_token_id=0)).eval()
    x = {"input_ids": torch.randint(0, 128, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long),
         "decoder_input_ids": torch.randint(0, 128, (2, 5))}
    names = slimfx.plan(model, "quantize blocks.*.mlp.down int8", example_inputs=x).rules[0].names
    assert names == ("decoder.block.0.layer.2.DenseReluDense.wo", "decoder.block.1.layer.2.DenseReluDense.wo")
