"""check_policy's `padding=`: the sides its masks pad, as the user's tokenizer does, and the hint
a left-padded failure of an output read at a fixed position gets. `tokens unpad` on an encoder
failed by default: BERT's pooler reads position 0, a pad token in a left-padded row, whose value
the compiled model does not keep."""
from __future__ import annotations

import pytest

from slimfx.models import tiny
from slimfx.testing import PolicyCheckError, check_policy


@pytest.fixture(scope="module")
def bert():
    return tiny("bert", layers=2)


def test_right_padding_only_draws_that_side_and_checks_unpad_exactly(bert):
    result = check_policy(bert, "tokens unpad", rtol=0, atol=1e-4, seed=1, padding="right")
    sides = {r.draw.padding for r in result.results}
    assert sides == {"none", "right"}


def test_a_left_padded_failure_of_a_fixed_position_output_says_why(bert):
    with pytest.raises(PolicyCheckError) as info:
        check_policy(bert, "tokens unpad", rtol=0, atol=1e-4, seed=1)
    text = str(info.value)
    assert "padding=left" in text and "pooler_output: max |compiled - original|" in text
    assert 'hint: pooler_output is not per token and this input pads on the left' in text
    assert 'pass padding="right"' in text


def test_no_padding_draws_full_masks(bert):
    result = check_policy(bert, "tokens unpad", rtol=0, atol=1e-4, seed=1, padding="none", max_examples=5)
    assert {r.draw.padding for r in result.results} == {"none"}


def test_an_unknown_padding_is_refused_before_the_compile(bert):
    with pytest.raises(ValueError, match="padding must be one of 'both', 'right', 'left', 'none', got 'top'"):
        check_policy(bert, "tokens unpad", padding="top")


@pytest.mark.parametrize("padding", ["left", "right"])
def test_a_side_asked_for_on_a_model_without_a_mask_input_is_refused(padding):
    """The draws were all unpadded, and the check passed as if it had tried padding."""
    llama = tiny("llama")
    ids = llama.example_inputs["input_ids"]
    with pytest.raises(ValueError, match=rf"padding='{padding}' asks for padded inputs, and the compiled model takes "
                                         r"no attention mask .* add an `attention_mask`.*or pass padding='none'"):
        check_policy(llama.model, "keep head", example_inputs={"input_ids": ids}, padding=padding)
    result = check_policy(llama.model, "keep head", example_inputs={"input_ids": ids}, max_examples=3)
    assert {r.draw.padding for r in result.results} == {"none"}  # the default pads where it can


def test_padding_no_input_long_enough_can_take_is_refused_before_the_compile(bert, monkeypatch):
    """Said after the compile: minutes of GPTQ on a large model before a refusal max_seq decides."""
    from slimfx import api

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before refusing")

    monkeypatch.setattr(api, "compile", no_compile)
    with pytest.raises(ValueError, match=r"padding='left' asks for padded inputs, and no input of two or more tokens "
                                         r"can be drawn \(max_seq=1: raise it\)"):
        check_policy(bert, "tokens unpad", max_seq=1, padding="left")


def test_attention_maps_are_compared_at_real_queries_only():
    """[batch, heads, query, key] was compared whole: a padded query's row, which `tokens unpad`
    does not compute, failed a model equal to the original at every real token."""
    model = tiny("bert", layers=2)
    model.model.set_attn_implementation("eager")
    example = dict(model.example_inputs, output_attentions=True)
    result = check_policy(model.model, "tokens unpad", example_inputs=example, rtol=1e-4, atol=1e-4, seed=1,
                          padding="right", max_examples=6)
    assert any(r.draw.padding == "right" for r in result.results)
