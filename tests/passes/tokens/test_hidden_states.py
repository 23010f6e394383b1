"""Token rules on a model captured with output_hidden_states=True: every block's stream is also an
output. The unpacks of those outputs took the nn_module_stack of the value they unpack, so the block
index counted an output's unpack as the block's output (the next block did not read it: a LintError),
and the merge restored every output, so a hidden state from before the merge was gathered through a
`dest` it was never on. Each hidden state is checked against the model run one sequence at a time."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.models import tiny

from test_merge import _batch
from tome_ref import merge_tokens

LENGTHS = [10, 6, 3]


@pytest.fixture(scope="module")
def bert_hs():
    lm = tiny("bert", layers=4)
    lm.model.config.output_hidden_states = True
    return lm.model


def _direct_states(model, ids: torch.Tensor, merge_after: int | None, ratio: float) -> list[torch.Tensor]:
    """The hidden states [L, D] of one unpadded sequence, a ToMe merge (tome_ref.py) after block
    `merge_after`: a state from before the merge is the block's own output; one after it gives every
    position the state of the token it was merged into (restore=true)."""
    with torch.no_grad():
        h = model.embeddings(input_ids=ids[None])
        states, sizes, dest = [h[0]], torch.ones(ids.numel()), torch.arange(ids.numel())
        for i, layer in enumerate(model.encoder.layer):
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out
            states.append(h[0][dest])
            if i == merge_after:
                x, sizes, d = merge_tokens(h[0], sizes, ratio, False)
                h, dest = x[None], d[dest]
    return states


def _check(got: tuple, batch: dict, want_of, packed_from: int) -> None:
    """Real positions equal the direct run; a state from the packed tokens on (from `packed_from`)
    has zeros at padding, one from before it is the padded model's own."""
    for row, n in enumerate(LENGTHS):
        want = want_of(batch["input_ids"][row, :n])
        assert len(got) == len(want) == 5
        for k, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g[row, :n], w, atol=1e-5, rtol=1e-4, msg=f"hidden state {k}")
            assert k < packed_from or g[row, n:].abs().sum() == 0, k


def test_unpad_returns_every_hidden_state_exactly(bert_hs):
    example = _batch([12, 8, 5], 12, 0)
    cm = slimfx.compile(bert_hs, "tokens unpad", example_inputs=example, calib=[example])
    batch = _batch(LENGTHS, 10, 4)
    with torch.no_grad():
        got = cm(**batch).hidden_states
    _check(got, batch, lambda ids: _direct_states(bert_hs, ids, None, 0.0), packed_from=0)


@pytest.mark.parametrize("unpad", [True, False])
def test_a_merge_restores_the_states_after_it_and_keeps_those_before_it(bert_hs, unpad):
    example = _batch([12, 8, 5], 12, 0)
    rules = ("tokens unpad\n" if unpad else "") + "tokens after blocks[1] merge ratio=0.5 restore=true"
    cm = slimfx.compile(bert_hs, rules, example_inputs=example, calib=[example])
    batch = _batch(LENGTHS, 10, 4)
    with torch.no_grad():
        got = cm(**batch).hidden_states
    # without `tokens unpad` the tokens are packed from block 1's input (hidden state 1) on
    _check(got, batch, lambda ids: _direct_states(bert_hs, ids, 1, 0.5), packed_from=0 if unpad else 1)


def test_restore_false_with_hidden_states_from_before_the_merge_is_refused_by_name(bert_hs):
    """Those states hold more tokens than remain: no shorter form of them is defined."""
    example = _batch([12, 8, 5], 12, 0)
    with pytest.raises(slimfx.SpecError, match=r"(?s)`restore=false`: output .* is computed before the last "
                                               r"`tokens after` step.*use `restore=true`"):
        slimfx.compile(bert_hs, "tokens unpad\ntokens after blocks[1] merge ratio=0.5 restore=false",
                       example_inputs=example, calib=[example])
