"""A compiled model's call checks [batch, seq] inputs against each other only where the graph
traced one sequence dim: inputs of lengths of their own (T5's decoder_input_ids, a second id
input) were refused on every call, the example's included."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfx
from slimfx.runtime.inputs import complete_inputs
from slimfx.runtime.program import InputInfo

TOKENS = {0: "batch", 1: "seq"}


class TwoIds(nn.Module):
    """Token ids [B, 8] beside category ids [B, 3]: two 2-D integer inputs of other widths."""

    def __init__(self):
        super().__init__()
        self.emb, self.cat, self.out = nn.Embedding(50, 8), nn.Embedding(10, 8), nn.Linear(8, 2)

    def forward(self, input_ids, cats):
        return self.out(self.emb(input_ids).mean(1) + self.cat(cats).sum(1))


def test_two_integer_inputs_of_other_widths_are_called():
    torch.manual_seed(0)
    m = TwoIds().eval()
    ids, cats = torch.randint(0, 50, (2, 8)), torch.randint(0, 10, (2, 3))
    cm = slimfx.compile(m, "", example_inputs={"input_ids": ids, "cats": cats})
    with torch.no_grad():
        assert torch.equal(cm(ids, cats), m(ids, cats))
        ids2, cats2 = torch.randint(0, 50, (3, 5)), torch.randint(0, 10, (3, 4))
        assert torch.equal(cm(input_ids=ids2, cats=cats2), m(ids2, cats2))


def test_t5_encoder_and_decoder_lengths_differ():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                   num_heads=4, use_cache=False)
    m = T5ForConditionalGeneration(cfg).eval()
    ids, dec = torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 3))
    # decoder_input_ids first: an omitted attention_mask must still be sized by input_ids
    ex = {"decoder_input_ids": dec, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cm = slimfx.compile(m, "", example_inputs=ex)
    with torch.no_grad():
        assert torch.equal(cm(**ex).logits, m(**ex).logits)
        assert torch.equal(cm(input_ids=ids, decoder_input_ids=dec).logits, m(**ex).logits)


def test_inputs_of_one_sequence_symbol_must_still_agree():
    from slimfx.runtime.call_inputs import _seq_lengths_disagree

    sym = {"input_ids": "s0", "attention_mask": "s0", "cats": "s1"}
    assert not _seq_lengths_disagree({"input_ids": (2, 8), "attention_mask": (2, 8), "cats": (2, 3)}, sym)
    assert _seq_lengths_disagree({"input_ids": (2, 8), "attention_mask": (2, 7), "cats": (2, 3)}, sym)


def test_an_omitted_mask_is_sized_by_the_input_of_its_sequence():
    infos = (InputInfo("decoder_input_ids", ("s0", "s2"), torch.long, TOKENS),
             InputInfo("input_ids", ("s0", "s1"), torch.long, TOKENS),
             InputInfo("attention_mask", ("s0", "s1"), torch.long, TOKENS))
    out = complete_inputs({"decoder_input_ids": torch.zeros(2, 3, dtype=torch.long),
                           "input_ids": torch.zeros(2, 8, dtype=torch.long)}, infos)
    assert out["attention_mask"].shape == (2, 8)


def test_an_input_past_the_models_positions_is_refused_by_name_after_load_too(tmp_path):
    """Saved, the graph lost export's guard: 129 tokens into BERT's 128 positions failed inside the
    graph ("The expanded size of the tensor (129) must match …")."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=128)).eval()
    ids = torch.randint(0, 128, (2, 7))
    cm = slimfx.compile(model, "", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert [i.limits for i in cm.graph.inputs] == [{1: 128}, {1: 128}]
    cm.save(tmp_path / "a")
    for m in (cm, slimfx.load(tmp_path / "a")):
        with torch.no_grad():
            fits = torch.randint(0, 128, (2, 128))
            torch.testing.assert_close(m(input_ids=fits).last_hidden_state, model(input_ids=fits).last_hidden_state)
            with pytest.raises(ValueError, match=r"input_ids \[2, 129\] has 129 in dim 1 \(seq\), at most 128"):
                m(input_ids=torch.randint(0, 128, (2, 129)))
