"""runtime/losses.py: the lm and distill losses against direct implementations written here,
over padded batches, labels and outputs without logits."""
from __future__ import annotations

import math

import pytest
import torch

from slimfx.runtime.losses import distill_loss, lm_loss

from renamed_ids import RenamedIds


def _batch(pad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(seed))


def _direct_lm(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean over kept positions t ≥ 1 of −log softmax(logits[t − 1])[labels[t]]."""
    terms = []
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if keep[b, t]:
                row = logits[b, t - 1].double()
                terms.append(-(row[labels[b, t]] - torch.logsumexp(row, 0)).item())
    return sum(terms) / len(terms)


@pytest.mark.parametrize("pad", [False, True])
def test_lm_loss_is_next_token_cross_entropy_over_the_kept_tokens(pad):
    batch, logits = _batch(pad), _logits()
    got = lm_loss({"logits": logits}, batch).item()
    assert got == pytest.approx(_direct_lm(logits, batch["input_ids"], batch["attention_mask"] != 0), rel=1e-5)


def test_labels_given_with_a_padded_batch_do_not_score_the_padding():
    """`labels` copied from padded input_ids (the usual way to write them) scored the pads, which
    the docstring says are ignored: the loss equals the one over input_ids alone."""
    batch, out = _batch(pad=True), {"logits": _logits()}
    by_ids = lm_loss(out, batch)
    assert lm_loss(out, dict(batch, labels=batch["input_ids"])) == by_ids
    # and -100 in the labels stays ignored: the same as masking those positions out
    labels = batch["input_ids"].clone()
    labels[0, 3] = -100
    masked = dict(batch, attention_mask=batch["attention_mask"].clone())
    masked["attention_mask"][0, 3] = 0
    assert lm_loss(out, dict(batch, labels=labels)) == lm_loss(out, masked)


def test_int32_ids_score_as_int64_ones():
    batch, out = _batch(pad=True), {"logits": _logits()}
    assert lm_loss(out, dict(batch, input_ids=batch["input_ids"].int())) == lm_loss(out, batch)


def test_lm_loss_refusals_say_what_to_do():
    batch = _batch(pad=False)
    with pytest.raises(ValueError, match="use loss='distill'"):
        lm_loss({"last_hidden_state": torch.zeros(2, 6, 4)}, batch)
    with pytest.raises(ValueError, match=r"do not match token ids \(2, 5\)"):
        lm_loss({"logits": _logits()}, dict(batch, input_ids=batch["input_ids"][:, :5]))
    with pytest.raises(ValueError, match="no token to predict"):
        lm_loss({"logits": _logits()}, dict(batch, attention_mask=torch.zeros(2, 6, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"scores input_ids \(or labels\)"):
        lm_loss({"logits": _logits()}, {"pixel_values": torch.zeros(1)})


def test_a_one_row_mask_holds_for_every_row_as_the_model_reads_it():
    """A [1, seq] attention_mask beside [batch, seq] ids masks every row in the model's forward;
    the losses ignored it (its shape was not the ids') and scored the padding."""
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(3))
    row = torch.tensor([[1, 1, 1, 1, 0, 0]])
    one, full = {"input_ids": ids, "attention_mask": row}, {"input_ids": ids, "attention_mask": row.expand(2, -1)}
    out = {"logits": _logits()}
    assert lm_loss(out, one) == lm_loss(out, full)
    assert lm_loss(out, one).item() == pytest.approx(_direct_lm(out["logits"], ids, row.expand(2, -1) != 0), rel=1e-5)
    teacher = _Teacher({"logits": _logits(2)})
    assert distill_loss(out, teacher, one) == distill_loss(out, teacher, full)
    assert distill_loss(out, teacher, one) != distill_loss(out, teacher, {"input_ids": ids})


def test_labels_as_a_list_are_refused_by_name():
    batch = _batch(pad=False)
    with pytest.raises(TypeError, match="labels is a list; give a tensor"):
        lm_loss({"logits": _logits()}, dict(batch, labels=batch["input_ids"].tolist()))


class _Teacher(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, **inputs):
        return self.out


def test_distill_loss_is_the_mean_kl_over_kept_positions():
    batch = _batch(pad=True)
    student, teacher = _logits(1), _logits(2)
    got = distill_loss({"logits": student}, _Teacher({"logits": teacher}), batch).item()
    keep = batch["attention_mask"] != 0
    kls = [sum(math.exp(lt) * (lt - ls) for lt, ls in zip(teacher[b, t].double().log_softmax(0).tolist(),
                                                          student[b, t].double().log_softmax(0).tolist()))
           for b in range(2) for t in range(6) if keep[b, t]]
    assert got == pytest.approx(sum(kls) / len(kls), rel=1e-5)


def test_distill_without_logits_is_the_mse_of_the_first_output_tensor():
    batch = _batch(pad=True)
    student, teacher = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    got = distill_loss((student,), _Teacher((teacher,)), batch).item()
    keep = batch["attention_mask"] != 0
    direct = ((student - teacher) ** 2).mean(-1)[keep].mean().item()
    assert got == pytest.approx(direct, rel=1e-6)
    with pytest.raises(ValueError, match=r"differ in shape"):
        distill_loss((student,), _Teacher((teacher[:, :5],)), batch)
    with pytest.raises(TypeError, match="found no output tensor in a tuple"):
        distill_loss(("text",), _Teacher(("text",)), batch)


def test_the_lm_loss_scores_the_ids_an_embedding_reads_whatever_their_name():
    """loss='lm' took only `input_ids` (or labels): a LoRA heal and a `by fisher` budget were
    refused on a decoder taking `tokens`, and slimfx.train died of "scores input_ids"."""
    import slimfx
    from slimfx.models import tiny

    lm = tiny("llama")
    batch = {"tokens": lm.example_inputs["input_ids"], "attention_mask": lm.example_inputs["attention_mask"]}
    model = RenamedIds(lm.model).eval()
    plan = slimfx.plan(model, "precision blocks.*.mlp.* choose {int8, int4} budget avg_bits<=6 by fisher",
                       example_inputs=batch)
    assert plan.rules[0].targets
    cm = slimfx.compile(model, "adapt blocks.*.attn.q lora rank=2 alpha=4", example_inputs=batch)
    with torch.no_grad():
        direct = lm_loss(lm.model(**lm.example_inputs), lm.example_inputs).item()
        assert lm_loss(cm(**batch), batch, "tokens").item() == pytest.approx(direct, rel=1e-5)
    result = slimfx.train(cm, [batch], steps=1, lr=1e-3)
    assert result.first == pytest.approx(direct, rel=1e-4)


def test_a_bare_output_tensor_is_scored_as_logits_when_it_can_be():
    """A model of one's own returning `self.out(x)` was told it has no logits; hidden states
    returned bare are still refused, by the vocabulary they cannot cover."""
    batch, logits = _batch(pad=True), _logits()
    assert lm_loss(logits, batch).item() == pytest.approx(
        _direct_lm(logits, batch["input_ids"], batch["attention_mask"] != 0), rel=1e-5)
    with pytest.raises(ValueError, match=r"has 4 values per position and the batch holds token id \d+: it is no "
                                         r"logits over the vocabulary; use loss='distill'"):
        lm_loss(torch.randn(2, 6, 4), dict(batch, input_ids=batch["input_ids"].clamp_min(5)))
