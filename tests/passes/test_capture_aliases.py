"""capture() with example inputs that are one tensor: torch.export merged them into one graph
input, so the graph read whichever placeholder survived (the HF idiom `labels=input_ids`)."""
from __future__ import annotations

import torch

import slimfx
from slimfx.models import tiny
from slimfx.passes.capture_cache import clear_cache


def _other_ids(ids: torch.Tensor) -> torch.Tensor:
    return torch.randint(3, 256, ids.shape, generator=torch.Generator().manual_seed(5))


def test_labels_that_are_the_input_ids_stay_a_separate_input():
    """Logits follow input_ids, not labels, and the loss is the original model's."""
    clear_cache()
    lm = tiny("llama", layers=1)
    x = lm.example_inputs
    cm = slimfx.compile(lm.model, "", example_inputs={**x, "labels": x["input_ids"]})
    other = _other_ids(x["input_ids"])
    with torch.no_grad():
        ref, out = lm.model(**x, labels=other), cm(**x, labels=other)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)


def test_an_aliased_capture_is_not_served_to_a_later_compile():
    """The cache key ignores tensor identity: the aliased compile must not leave a merged graph
    for a later compile with cloned labels."""
    clear_cache()
    lm = tiny("llama", layers=1)
    x = lm.example_inputs
    slimfx.compile(lm.model, "", example_inputs={**x, "labels": x["input_ids"]})
    cm = slimfx.compile(lm.model, "", example_inputs={**x, "labels": x["input_ids"].clone()})
    other = _other_ids(x["input_ids"])
    with torch.no_grad():
        assert torch.equal(cm(**x, labels=other).logits, lm.model(**x, labels=other).logits)


def test_an_example_input_that_is_a_view_leaves_a_graph_every_call_runs():
    """export guarded the slice's base, which a plain tensor lacks: every call failed ("'NoneType'
    object has no attribute 'size'"), and the cached trace failed a later compile's calls too."""
    clear_cache()
    lm = tiny("llama", layers=1)
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sliced = {k: v[:, :8] for k, v in batch.items()}  # views, and not contiguous
    for example in (sliced, {k: v.contiguous() for k, v in sliced.items()}, {k: v[:2] for k, v in batch.items()}):
        cm = slimfx.compile(lm.model, "", example_inputs=example)
        with torch.no_grad():
            for x in (batch, sliced):
                assert torch.equal(cm(**x).logits, lm.model(**x).logits)
