"""`heal method=lora … generate=N` (passes/collapse/teacher_text.py): the rows are the model's own
sampled continuations of the calibration rows' openings — the same tokens as Hugging Face's
`generate` called by hand with the same seed —, whole, seeded, leaving the caller's random state
and the model's mode as they were; the heal trains on them and says so; bad input."""
from __future__ import annotations

import pytest
import torch

import slimfx
import torch.nn.functional as F

from slimfx import SpecError
from slimfx.calibration import calibration_batches
from slimfx.models import tiny
from slimfx.passes.collapse.teacher_text import PROMPT, WriteError, teacher_batches
from slimfx.runtime.progress import Progress


def _lm():
    return tiny("llama", layers=3, seed=4)


def _calib(lm, rows=3, length=20):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, lm.model.config.vocab_size, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :length - PROMPT + 1] = 0  # row 0: left padding leaves PROMPT - 1 real tokens: no opening
    return [{"input_ids": ids, "attention_mask": mask}]


def test_rows_are_the_models_own_continuations_of_the_openings():
    lm = _lm()
    calib = _calib(lm)
    for layer in lm.model.model.layers:  # dropout that only train mode applies: writing in it would show
        layer.self_attn.attention_dropout = 0.5
    lm.model.train()
    state = torch.get_rng_state()
    batches = teacher_batches(lm.model, calib, 300, Progress.for_terminal(False))
    assert torch.equal(torch.get_rng_state(), state) and lm.model.training  # as they were
    rows = torch.cat([b["input_ids"] for b in batches])
    new = lm.model.config.max_position_embeddings - PROMPT  # the tiny model reads 128 positions
    assert rows.shape == (-(-300 // new), PROMPT + new) and all(b["attention_mask"].all() for b in batches)
    openings = [calib[0]["input_ids"][i, :PROMPT] for i in (1, 2)]  # row 0 is too short
    for i, row in enumerate(rows):
        assert torch.equal(row[:PROMPT], openings[i % 2])
    # The reference: Hugging Face's generate by hand, in eval mode, seeded the same way.
    lm.model.eval()
    torch.manual_seed(0)
    ids = torch.stack([openings[i % 2] for i in range(len(rows))])
    pad = lm.model.generation_config.pad_token_id
    want = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_p=0.95, top_k=0, min_new_tokens=new, max_new_tokens=new,
                             pad_token_id=pad if pad is not None else lm.model.generation_config.eos_token_id)
    assert torch.equal(rows, want)
    again = torch.cat([b["input_ids"] for b in teacher_batches(lm.model, calib, 300, Progress.for_terminal(False))])
    assert torch.equal(again, rows)  # seeded: the same policy heals the same way


def test_what_cannot_write_says_why():
    lm = _lm()
    with pytest.raises(WriteError, match="no usable `generate`") as e:
        teacher_batches(torch.nn.Linear(2, 2), _calib(lm), 10, Progress.for_terminal(False))
    assert "leave out generate=" in e.value.hint
    short = [{"input_ids": torch.ones(2, PROMPT - 1, dtype=torch.long)}]
    with pytest.raises(WriteError, match=f"no calibration row has the {PROMPT} real tokens") as e:
        teacher_batches(lm.model, short, 10, Progress.for_terminal(False))
    assert "longer calibration text" in e.value.hint


def test_the_models_own_generation_settings_do_not_bend_the_text():
    """A repetition penalty (or any sampling setting) in the model's generation_config is not
    applied: the rows are the same as without it."""
    lm = _lm()
    calib = _calib(lm)
    plain = teacher_batches(lm.model, calib, 200, Progress.for_terminal(False))
    lm.model.generation_config.repetition_penalty = 5.0
    lm.model.generation_config.no_repeat_ngram_size = 2
    bent = teacher_batches(lm.model, calib, 200, Progress.for_terminal(False))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(plain, bent))
    assert lm.model.generation_config.repetition_penalty == 5.0  # the model's own config put back


def test_the_heal_trains_on_the_written_text_and_reports_it():
    lm = _lm()
    # The tiny model's default calibration is 3,072 byte tokens: 6 batches; 200 tokens written are
    # 2 rows of 116 new tokens (it reads 128 positions, 12 are the opening): one more batch, the 7th.
    rules = "drop blocks[1]\nheal method=lora steps=7 lr=0.01 rank=4 distill=true merge=false generate=200"
    cm = slimfx.compile(lm, rules)
    report = cm.report.rules[1]
    assert report.details["generated_tokens"] == 2 * 116 and "232 tokens the uncompressed model wrote" in report.notes[0]
    assert "last on written text" in report.notes[0]
    # Step 7 reads the written batch with the adapters the 6 calibration steps left: the same as a
    # heal of 6 steps without generate=. Its loss, by hand, is KL(original ‖ healed) on those rows.
    six = slimfx.compile(lm, rules.replace("steps=7", "steps=6").replace(" generate=200", ""))
    assert six.report.rules[1].details["generated_tokens"] == 0
    written = teacher_batches(lm.model, calibration_batches(lm, None), 200, Progress.for_terminal(False))
    assert len(written) == 1
    with torch.no_grad():
        log_t = F.log_softmax(lm.model(**written[0]).logits.float(), -1)
        log_s = F.log_softmax(six(**written[0]).logits.float(), -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()
    assert report.details["last_loss"] == pytest.approx(kl, rel=1e-4)
    assert report.details["first_loss"] == six.report.rules[1].details["first_loss"]


def test_generate_needs_steps_that_reach_the_text():
    """Steps go through the calibration batches first: text no step would read is refused before
    any is written."""
    with pytest.raises(SpecError) as e:
        slimfx.compile(_lm(), "drop blocks[1]\nheal method=lora steps=6 distill=true generate=200")
    message = str(e.value)
    assert "the text fills 1 batches, but the steps reach 0 of them after the 6 calibration batches" in message
    assert "steps=7 or more" in message


def test_generate_belongs_to_the_lora_heal():
    with pytest.raises(SpecError) as e:
        slimfx.compile(_lm(), "drop blocks[1]\nheal method=linear generate=100")
    assert "generate" in str(e.value)
    with pytest.raises(SpecError) as e:
        slimfx.compile(_lm(), "drop blocks[1]\nheal method=lora generate=-5")
    assert "an integer ≥ 0" in str(e.value)


def test_an_encoder_writes_no_text():
    lm = tiny("bert", layers=3)
    with pytest.raises(SpecError) as e:
        slimfx.compile(lm, "drop blocks[1]\nheal method=lora steps=1 distill=true generate=100")
    assert e.value.diagnostics[0].kind == "unsupported" and "an encoder writes no text" in str(e.value)
    assert "leave out generate=" in str(e.value)
