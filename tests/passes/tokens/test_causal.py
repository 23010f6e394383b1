"""Which models the token rules treat as causal: not only Hugging Face's generating models
(GenerationMixin) but any whose positions see only those before them — a bare LlamaModel, CLIP's
text model. Merging tokens was accepted on those and made earlier outputs depend on later tokens."""
from __future__ import annotations

import pytest
import torch
import transformers

import slimfx
from slimfx.dsl.errors import SpecError
from slimfx.models import tiny
from slimfx.passes.capture import capture
from slimfx.passes.causal import is_causal

from renamed_ids import RenamedIds


def _ids(seq: int = 9, seed: int = 0) -> dict:
    ids = torch.randint(3, 200, (2, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _clip_text():
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32, projection_dim=16,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.CLIPTextModel(cfg).eval()


def _looks_ahead(model) -> bool:
    """The test's own check: does changing the last token move any earlier position's output?"""
    batch = _ids()
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][:, -1] = (changed["input_ids"][:, -1] + 1) % 200
    with torch.no_grad():
        a, b = model(**batch).last_hidden_state, model(**changed).last_hidden_state
    return bool((a[:, :-1] - b[:, :-1]).abs().max() > 1e-4)


MODELS = {
    "llama (with its head)": lambda: tiny("llama", layers=2).model,
    "bare LlamaModel": lambda: tiny("llama", layers=2).model.model,
    "CLIP text": _clip_text,
    "bert": lambda: tiny("bert", layers=2).model,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_graph_is_causal_exactly_when_the_model_is(name):
    model = MODELS[name]().eval()
    graph = capture(model, _ids())
    if name == "llama (with its head)":
        assert is_causal(graph)  # GenerationMixin: decided without a run
        return
    assert is_causal(graph) == (not _looks_ahead(model))
    assert is_causal(graph) == (name != "bert")


@pytest.mark.parametrize("name", ["bare LlamaModel", "CLIP text"])
def test_merge_is_refused_on_a_causal_model_without_a_generation_head(name):
    with pytest.raises(SpecError, match="is causal"):
        slimfx.compile(MODELS[name](), "tokens after blocks[0] merge ratio=0.25 restore=true", example_inputs=_ids())


def test_prune_on_a_bare_decoder_is_the_decoders_prune():
    # The same rule on LlamaForCausalLM and on its LlamaModel: the head's logits of the bare
    # model's output equal the whole model's (last position kept, decoder scoring); scored as an
    # encoder, the kept tokens, and so the logits, differ.
    lm = tiny("llama", layers=3)
    example = _ids(12, seed=3)
    rule = "tokens after blocks[0] prune keep=0.4 score=attention protect=none restore=true"
    whole = slimfx.compile(lm.model, rule, example_inputs=example, calib=[example])
    bare = slimfx.compile(lm.model.model, rule, example_inputs=example, calib=[example])
    with torch.no_grad():
        want = whole(**example).logits
        got = lm.model.lm_head(bare(**example).last_hidden_state)
        plain = lm.model(**example).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (want - plain).abs().max() > 1e-3  # the prune did something


@pytest.mark.parametrize("name", ["bare LlamaModel", "CLIP text", "bert"])
def test_the_token_ids_are_found_by_what_reads_them_not_by_their_name(name):
    """Only an input named `input_ids` was probed: a decoder taking `tokens` was not causal, so
    `merge` compiled on it and `prune` scored it as an encoder and dropped its last position."""
    example = _ids()
    renamed = {"tokens": example["input_ids"], "attention_mask": example["attention_mask"]}
    assert is_causal(capture(RenamedIds(MODELS[name]()).eval(), renamed)) == (name != "bert")


def test_a_decoder_taking_tokens_prunes_as_one_taking_input_ids():
    inner = tiny("llama", layers=3).model.model
    example = _ids(12, seed=3)
    rule = "tokens after blocks[0] prune keep=0.4 score=attention protect=none restore=true"
    renamed = {"tokens": example["input_ids"], "attention_mask": example["attention_mask"]}
    with pytest.raises(SpecError, match="is causal"):
        slimfx.compile(RenamedIds(inner), "tokens after blocks[0] merge ratio=0.25 restore=true", example_inputs=renamed)
    by_name = slimfx.compile(RenamedIds(inner), rule, example_inputs=renamed, calib=[renamed])
    by_ids = slimfx.compile(inner, rule, example_inputs=example, calib=[example])
    with torch.no_grad():
        torch.testing.assert_close(by_name(**renamed).last_hidden_state, by_ids(**example).last_hidden_state)


@pytest.mark.parametrize("name, rule", [("bare LlamaModel", "tokens after blocks[0] prune keep=0.5 restore=true"),
                                        ("bert", "tokens after blocks[0] merge ratio=0.5 restore=true")])
def test_the_probe_of_a_compiled_model_reads_the_stream_before_its_token_step(name, rule):
    """Compiled again, a model whose first block ends in a prune or merge: the block's output has
    fewer rows than positions, and the probe indexed it by position (a raw IndexError)."""
    from slimfx.passes.graph import ModelGraph
    from slimfx.runtime.program_copy import copy_program

    cm = slimfx.compile(MODELS[name]().eval(), rule, example_inputs=_ids())
    assert is_causal(ModelGraph.of(copy_program(cm.graph))) == (name != "bert")


@pytest.mark.parametrize("arch", ["roberta", "bare OPT"])
def test_the_probe_gives_positions_a_call_must_give_itself(arch):
    """Captured with position_ids that a call must give (the model numbers them its own way), the
    probe ran without them: "calibration batch 0 lacks inputs ['position_ids']"."""
    model = tiny("roberta", layers=2).model if arch == "roberta" else tiny("opt", layers=2).model.model.decoder
    example = {**_ids(), "position_ids": torch.arange(9).expand(2, 9) + (2 if arch == "roberta" else 0)}
    graph = capture(model, example)
    assert [i.fill for i in graph.inputs if i.name == "position_ids"] == [False]
    assert is_causal(graph) == (arch != "roberta")
