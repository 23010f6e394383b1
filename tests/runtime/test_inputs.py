"""A compiled model is called like the original: inputs the original's forward may omit
(attention_mask, token_type_ids, position_ids) are filled as Hugging Face fills them."""
import pytest
import torch

import slimfx
from slimfx.models import tiny
from slimfx.runtime.inputs import complete_inputs
from slimfx.runtime.program import InputInfo

TOKENS = {0: "batch", 1: "seq"}


def test_complete_inputs_fills_only_what_it_knows_sized_by_a_given_input():
    infos = (InputInfo("input_ids", (2, "s0"), torch.long, TOKENS),
             InputInfo("attention_mask", (2, "s0"), torch.long, TOKENS),
             InputInfo("position_ids", (2, "s0"), torch.long, TOKENS),
             InputInfo("pixel_values", (2, 3), torch.float32, {0: "batch"}))
    ids = torch.tensor([[5, 6, 7]])
    out = complete_inputs({"input_ids": ids, "attention_mask": None}, infos)
    assert out["attention_mask"].tolist() == [[1, 1, 1]] and out["attention_mask"].dtype == torch.long
    assert out["position_ids"].tolist() == [[0, 1, 2]]
    assert "pixel_values" not in out  # not fillable: the caller's missing-input error names it
    assert complete_inputs({}, infos) == {}  # nothing to size a default by


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_input_ids_alone_gives_the_originals_result(arch):
    m = tiny(arch)
    cm = slimfx.compile(m.model, "policy p {\n    quantize blocks.*.** : Linear int8\n}\n",
                        example_inputs=m.example_inputs)
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        want = cm(input_ids=ids, attention_mask=torch.ones_like(ids))
        for got in (cm(input_ids=ids), cm(ids), cm(input_ids=ids, attention_mask=None)):
            assert torch.equal(got[0], want[0])
        # ...and the original called the same way agrees with the identity compile of it
        identity = slimfx.compile(m.model, "", example_inputs=m.example_inputs)
        torch.testing.assert_close(identity(input_ids=ids)[0], m.model(input_ids=ids)[0], rtol=1e-5, atol=1e-5)


def test_a_missing_input_that_cannot_be_filled_is_named():
    m = tiny("llama")
    cm = slimfx.compile(m.model, "", example_inputs=m.example_inputs)
    with pytest.raises(TypeError, match=r"missing \['input_ids'\]"):
        cm(attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_a_mask_left_out_beside_inputs_embeds_is_filled_from_them():
    """Only 2-D inputs sized the fill: a call of embeddings alone was refused for lacking the mask."""
    model = tiny("llama").model
    embeds = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cm = slimfx.compile(model, "", example_inputs={"inputs_embeds": embeds,
                                                   "attention_mask": torch.ones(2, 5, dtype=torch.long)})
    other = torch.randn(3, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(cm(inputs_embeds=other).logits, model(inputs_embeds=other).logits)
