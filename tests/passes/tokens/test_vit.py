"""Token rules on a ViT: no attention mask and a fixed number of patches (captured as a constant,
not a symbol); merging and pruning pack the tokens from the first selected block on and match a
direct run of the model one image at a time (tome_ref.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import slimfx
from slimfx.models import tiny

from tome_ref import cls_attention, merge_tokens, prune_tokens, vit_with_token_ops

RULES = {
    "merge": "tokens after blocks[1:3] merge ratio=0.3 protect=cls restore=true",
    "keys": "tokens after blocks[1:3] merge ratio=0.3 protect=cls by=keys restore=true",
    "prune": "tokens after blocks[1] prune keep=0.5 score=attention protect=cls restore=true",
}
OPS = {
    "merge": {i: lambda x, s, _: merge_tokens(x, s, 0.3, True) for i in (1, 2)},
    "keys": {i: lambda x, s, qk: merge_tokens(x, s, 0.3, True, metric=qk()[1].mean(0)) for i in (1, 2)},
    "prune": {1: lambda x, s, qk: prune_tokens(x, s, 0.5, True, score=cls_attention(*qk()))},
}


def _images(batch: int, seed: int) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


@pytest.fixture(scope="module")
def vit():
    return tiny("vit", layers=4)


@pytest.fixture(scope="module")
def compiled(vit):
    example = _images(3, 0)
    return {name: slimfx.compile(vit.model, rules, example_inputs=example, calib=[example])
            for name, rules in RULES.items()}


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 4), seed=st.integers(0, 1000), name=st.sampled_from(sorted(RULES)))
def test_vit_token_rules_equal_a_direct_run_one_image_at_a_time(vit, compiled, batch, seed, name):
    images = _images(batch, seed)
    with torch.no_grad():
        got = compiled[name](**images).logits
    for row in range(batch):
        want = vit_with_token_ops(vit.model, images["pixel_values"][row], OPS[name])
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-4)


def test_the_rules_change_the_logits_and_count_the_patches(vit, compiled):
    images = _images(3, 0)
    with torch.no_grad():
        plain = vit.model(**images).logits
        for name, cm in compiled.items():
            assert (cm(**images).logits - plain).abs().max() > 1e-4, name
    # 17 tokens per image (16 patches and CLS): ⌊0.3·17⌋ = 5 then ⌊0.3·12⌋ = 3 merged per image.
    assert compiled["merge"].report.rules[0].details["tokens"] == ["51→36", "36→27"]
    assert any("packed from vit.layers.1's input" in n for n in compiled["merge"].report.rules[0].notes)


def test_a_ratio_that_merges_nothing_is_bit_identical(vit):
    images = _images(3, 5)
    cm = slimfx.compile(vit.model, "tokens after blocks[1] merge ratio=0.05 restore=true", example_inputs=images,
                        calib=[images])
    with torch.no_grad():
        assert torch.equal(cm(**images).logits, vit.model(**images).logits)


def test_a_fixed_length_equal_to_a_feature_size_is_refused():
    """17 patches and an MLP of width 17: a view with a 17 in it could be either."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=17,
                       image_size=32, patch_size=8, num_labels=3)
    model = ViTForImageClassification(config).eval()
    images = _images(2, 0)
    with pytest.raises(slimfx.SpecError, match="fixed sequence length 17, which is also"):
        slimfx.compile(model, "tokens after blocks[1] merge ratio=0.3 restore=true", example_inputs=images,
                       calib=[images])


def test_a_fixed_length_that_is_the_position_table_says_how_to_capture_another():
    """CLIP's vision tower at its own image size: 17 tokens and a 17-row position table. "Capture
    with another input size" alone failed in Hugging Face ("Input image size (40*40) doesn't match
    model"): it needs interpolate_pos_encoding=True, which the hint now says (and which works)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=32, patch_size=8)).eval()
    rule = "tokens after blocks[0] merge ratio=0.25 restore=true"
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.compile(model, rule, example_inputs={"pixel_values": torch.randn(2, 3, 32, 32)})
    assert "embeddings.position_embedding holds exactly 17 positions" in e.value.hint
    assert "interpolate_pos_encoding=True" in e.value.hint
    slimfx.compile(model, rule, example_inputs={"pixel_values": torch.randn(2, 3, 40, 40),
                                                "interpolate_pos_encoding": True})
