"""runtime/masters.py: half adapters train on float32 masters, and whatever is written meanwhile
(a checkpoint, a copy, a merge) holds the dtype the program declares."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimfx
from slimfx import models
from slimfx.runtime.masters import float32_masters


def test_float32_masters_hold_half_parameters_as_float32_inside_and_round_them_back_after():
    half = nn.Parameter(torch.tensor([1.0, 2.0 ** -12], dtype=torch.float16))
    full = nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([half, full], lr=1.0)
    with pytest.raises(RuntimeError, match="stop"), float32_masters([half, full]):
        assert half.dtype == torch.float32 and full.dtype == torch.float32
        for _ in range(8):  # eight steps of 2^-13: each below half of fp16's ulp at 1.0, together one ulp
            half.grad = torch.tensor([-(2.0 ** -13), 0.0])
            opt.step()
        raise RuntimeError("stop")  # rounded back on an exception too
    assert half.dtype == torch.float16 and half.grad is None and half.tolist() == [1.0 + 2.0 ** -10, 2.0 ** -12]
    assert full.dtype == torch.float32


def test_a_checkpoint_copy_or_merge_inside_the_masters_holds_the_declared_dtype(tmp_path):
    """Saved inside (a checkpoint between steps of a plain loop), the float32 masters were written
    under a program declaring fp16, and no load accepted the artifact; a copy or a merge failed
    the same way."""
    lm = models.tiny("llama")
    cm = slimfx.compile(lm, "adapt blocks.*.attn.{q,v} lora rank=4 alpha=8 dtype=fp16")
    params = cm.adapter_parameters()
    with float32_masters(params):
        with torch.no_grad():
            for p in params:
                p.add_(0.01)  # B leaves 0: the adapters now change the output
        cm.save(tmp_path / "ckpt")
        copied, merged = copy.deepcopy(cm), cm.merge_adapters()
        with torch.no_grad():
            inside = cm(**lm.example_inputs).logits
    loaded = slimfx.load(tmp_path / "ckpt")
    assert all(p.dtype == torch.float16 for p in loaded.adapter_parameters() + copied.adapter_parameters())
    with torch.no_grad():
        after = cm(**lm.example_inputs).logits  # rounded back on the way out, as saved
        for other in (loaded, copied):
            torch.testing.assert_close(other(**lm.example_inputs).logits, after, rtol=0, atol=0)
        torch.testing.assert_close(merged(**lm.example_inputs).logits, after, atol=1e-4, rtol=1e-4)
    assert not torch.equal(inside, lm.model(**lm.example_inputs).logits)


def test_a_merge_inside_the_masters_reports_the_bytes_the_adapters_are_stored_in():
    lm = models.tiny("llama")
    cm = slimfx.compile(lm, "adapt blocks.*.attn.q lora rank=4 alpha=8 dtype=fp16")
    with float32_masters(cm.adapter_parameters()):
        merged = cm.merge_adapters()
    assert merged.report.bytes_after == merged.weight_bytes() == cm.report.bytes_after - merged.report.rules[0].bytes_before
