"""`restore=false`: outputs hold the remaining tokens only, and the CompiledModel says which."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.models import tiny

from test_prune import _batch

MERGE = "tokens unpad\ntokens after blocks[1:3] merge ratio=0.3 protect=cls restore={restore}"


@pytest.fixture(scope="module")
def both(bert):
    example = _batch([12, 8, 5], 12, 0)
    return {r: slimfx.compile(bert.model, MERGE.format(restore=r), example_inputs=example, calib=[example])
            for r in ("true", "false")}


def test_shorter_outputs_are_the_kept_tokens_of_the_restored_ones(both):
    batch = _batch([12, 8, 5], 12, 0)
    with torch.no_grad():
        full = both["true"](**batch).last_hidden_state
        short = both["false"](**batch).last_hidden_state
    kept = both["false"].kept_tokens
    # ⌊0.3·L⌋ merged per step: 12→9→7, 8→6→5, 5→4→3: the longest remaining sequence is 7.
    assert short.shape == (3, 7, full.shape[-1])
    assert kept["positions"].shape == kept["sizes"].shape == (3, 7)
    for row, n in enumerate((7, 5, 3)):
        pos = kept["positions"][row]
        assert (pos[:n] >= 0).all() and (pos[n:] == -1).all() and (pos[:n].diff() > 0).all()
        assert kept["sizes"][row].sum() == (12, 8, 5)[row]  # every real token is held somewhere
        assert pos[0] == 0  # protect=cls
        assert torch.equal(short[row, :n], full[row, pos[:n]])
        assert short[row, n:].abs().sum() == 0
    # Size-weighted mean pooling over the kept tokens equals mean pooling of the restored output.
    pooled = (short * kept["sizes"][..., None]).sum(1) / kept["sizes"].sum(1, keepdim=True)
    mask = batch["attention_mask"][..., None].float()
    torch.testing.assert_close(pooled, (full * mask).sum(1) / mask.sum(1))


def test_the_pooler_still_reads_the_first_token(both):
    batch = _batch([9, 12, 4], 12, 6)
    with torch.no_grad():
        a, b = both["true"](**batch), both["false"](**batch)
    assert torch.equal(a.pooler_output, b.pooler_output)


def test_restore_false_survives_save_and_load(both, tmp_path):
    both["false"].save(tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    batch = _batch([3, 11], 11, 2)
    with torch.no_grad():
        want = both["false"](**batch).last_hidden_state
        got = back(**batch).last_hidden_state
    assert torch.equal(got, want)
    assert torch.equal(back.kept_tokens["positions"], both["false"].kept_tokens["positions"])


def test_a_decoder_returns_its_last_token_last():
    """Decoders are left-aligned on the right: logits[:, -1] is each sequence's next-token logits."""
    lm = tiny("llama", layers=3)
    example = _batch([7, 4, 6], 7, 3, left=True)
    rules = "tokens unpad\ntokens after blocks[0] prune keep=0.5 score=norm restore={}"
    full, short = (slimfx.compile(lm.model, rules.format(r), example_inputs=example, calib=[example])
                   for r in ("true", "false"))
    batch = _batch([5, 7, 2], 7, 9, left=True)
    with torch.no_grad():
        a, b = full(**batch).logits, short(**batch).logits
    assert b.shape[:2] == (3, 4)  # ⌈0.5·L⌉ of 5, 7, 2 = 3, 4, 1
    assert torch.equal(b[:, -1], a[:, -1])
    assert (short.kept_tokens["positions"][:, -1] == 6).all()  # the last position, left padded


def test_a_model_without_sequence_outputs_is_told_so():
    vit = tiny("vit", layers=3)
    images = {"pixel_values": torch.randn(2, 3, 32, 32)}
    cm = slimfx.compile(vit.model, "tokens after blocks[1] merge ratio=0.3", example_inputs=images,
                        calib=[images])
    assert any("restore=false changes nothing here" in n for n in cm.report.rules[0].notes)
    with torch.no_grad():
        cm(**images)
    assert cm.kept_tokens is None


def test_mixed_restore_is_an_error_before_compiling():
    with pytest.raises(slimfx.SpecError, match="invalid-combination"):
        slimfx.parse("policy p {\n tokens unpad\n tokens after blocks[1] merge ratio=0.3\n"
                     " tokens after blocks[2] merge ratio=0.3 restore=true\n}")
