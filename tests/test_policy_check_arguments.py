"""check_policy's arguments that are easy to get silently wrong: rtol beside a metric, the seed
pytest's --hypothesis-seed gives, and how long the drawn sequences are by default (past a short
sliding window, where the attention mask changes)."""
from __future__ import annotations

import types

import pytest
import torch
from hypothesis import core as hypothesis_core
from torch import nn

from slimfx import api
from slimfx.models import tiny
from slimfx.policy_check import _seed_of_text
from slimfx.policy_inputs import DEFAULT_MAX_SEQ, default_max_seq, sliding_window
from slimfx.testing import check_policy

from policy_check_tiny import quantize


class _Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(40, 8), nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.emb(input_ids)) * attention_mask[..., None]


def _affine():
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 6))
    return _Affine().eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_rtol_beside_a_metric_is_refused_before_compiling(monkeypatch):
    """Only atol bounds a metric's float: an rtol given with it was ignored without a word."""
    monkeypatch.setattr(api, "compile", lambda *a, **k: pytest.fail("compiled before refusing rtol"))
    model, example = _affine()
    with pytest.raises(ValueError, match=r"rtol=0\.1 has no meaning with a metric .* drop rtol"):
        check_policy(model, "", example_inputs=example, metric=lambda o, c: 0.0, rtol=0.1)


@pytest.mark.parametrize("forced, expected", [(1234, 1234), ("nightly", _seed_of_text("nightly"))])
def test_pytest_hypothesis_seed_fixes_check_policys_own_draws(monkeypatch, forced, expected):
    """--hypothesis-seed fixes @given tests only; check_policy's own test drew from a fresh seed,
    so a failing run could not be replayed from the command line."""
    model, example = _affine()
    wanted = check_policy(model, "", example_inputs=example, max_examples=6, seed=expected).draws
    monkeypatch.setattr(hypothesis_core, "global_force_seed", forced)
    first = check_policy(model, "", example_inputs=example, max_examples=6).draws
    again = check_policy(model, "", example_inputs=example, max_examples=6).draws
    assert first == again == wanted


def test_a_short_sliding_window_is_drawn_past():
    """Inputs of at most 32 tokens never reached tiny gemma2's 64-token window, where its
    alternate layers' mask differs from a causal one."""
    gemma2 = tiny("gemma2")
    assert sliding_window(gemma2.model.config) == 64
    assert default_max_seq(gemma2.model) == (72, None)
    result = check_policy(gemma2, quantize("int8"), rtol=0, atol=0.05, max_examples=15, seed=3)
    assert max(d.seq for d in result.draws) > 64


def _with_config(**fields) -> nn.Module:
    module = nn.Linear(2, 2)
    module.config = types.SimpleNamespace(**fields)
    return module


def test_windows_not_in_force_keep_the_default_length():
    # Mistral's 4,096 window is past its position table; Qwen2's is switched off; layer types
    # without a sliding layer; no window at all.
    for config in (dict(sliding_window=4096, max_position_embeddings=128),
                   dict(sliding_window=16, use_sliding_window=False, max_position_embeddings=128),
                   dict(sliding_window=16, layer_types=["full_attention"], max_position_embeddings=128),
                   dict(sliding_window=None), dict()):
        assert default_max_seq(_with_config(**config)) == (DEFAULT_MAX_SEQ, None), config


def test_gpt_neo_local_layers_and_a_text_configs_window_are_seen():
    assert sliding_window(types.SimpleNamespace(attention_layers=["global", "local"], window_size=256,
                                                max_position_embeddings=2048)) == 256
    assert sliding_window(types.SimpleNamespace(attention_layers=["global"], window_size=256)) is None
    text = types.SimpleNamespace(sliding_window=64, max_position_embeddings=128)
    assert default_max_seq(_with_config(text_config=text)) == (72, None)


def test_a_window_too_long_to_draw_past_is_said():
    length, note = default_max_seq(_with_config(sliding_window=4096, max_position_embeddings=8192))
    assert length == DEFAULT_MAX_SEQ
    assert "never reach the model's 4096-token sliding window; pass max_seq=4104" in note
    # a window below the default is already drawn past
    assert default_max_seq(_with_config(sliding_window=8, max_position_embeddings=128)) == (DEFAULT_MAX_SEQ, None)


@pytest.mark.parametrize("max_batch", [1025, 10**9])
def test_a_batch_past_what_a_property_test_draws_is_refused_before_compiling(max_batch):
    """max_batch=10**9 tried to allocate such a batch, and the failing allocation, not the same on
    hypothesis' replay, came out as its FlakyFailure."""
    with pytest.raises(ValueError, match=rf"check_policy: max_batch is at most 1024 .*got {max_batch}"):
        check_policy(tiny("llama"), "quantize blocks.*.** : Linear int8 nonsense=1", max_batch=max_batch)
