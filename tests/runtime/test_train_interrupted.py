"""slimfx.train stopped partway (a bad later batch, Ctrl-C) leaves the adapters as they were: it
left steps 1–2's updates in place with no result returned. The teacher's modes come back per
submodule, and numpy step counts and non-numeric lrs get the argument messages."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import slimfx
from slimfx.models import tiny


def _cm():
    lm = tiny("llama")
    cm = slimfx.compile(lm, "quantize blocks.*.mlp.* int4 group=16\nadapt blocks.*.attn.{q,v} dora rank=4 dropout=0.1",
                        progress=False)  # quantized: something for a distillation to learn
    return lm, cm


def _batch(pad: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 6, dtype=torch.long) if pad else torch.ones(2, 6, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}


def _interrupt_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C as train() starts its `step`-th step (1-based), the steps before it taken."""
    from slimfx.runtime import train as train_module

    real, calls = train_module._step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_step", interrupted)


def test_a_bad_later_batch_restores_the_adapters_and_says_so():
    lm, cm = _cm()
    before = [p.detach().clone() for p in cm.adapter_parameters()]
    with pytest.raises(ValueError, match="no token to predict") as info:
        slimfx.train(cm, [_batch(), _batch(), _batch(pad=True)], steps=3, lr=1e-2)
    assert "stopped after 2 of 3 steps; the adapters are restored" in "\n".join(info.value.__notes__)
    assert all(torch.equal(p, b) for p, b in zip(cm.adapter_parameters(), before))
    assert cm.training is False
    dora_terms = [n for n in cm.program.graph.nodes if n.target is torch.ops.aten.type_as.default]
    assert not dora_terms, "eval again: DoRA's training-only base term is gone from the graph"


def test_an_interrupt_restores_the_adapters(monkeypatch):
    lm, cm = _cm()
    before = [p.detach().clone() for p in cm.adapter_parameters()]
    _interrupt_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        slimfx.train(cm, [_batch()], steps=3, lr=1e-2)
    assert all(torch.equal(p, b) for p, b in zip(cm.adapter_parameters(), before))


def test_a_callers_optimizer_goes_back_with_the_adapters(monkeypatch):
    """Its AdamW moments and step counts kept the undone updates (`step` 2.0 after a stop at step
    3), and the next call stepped on from them."""
    lm, cm = _cm()
    opt = torch.optim.AdamW(cm.adapter_parameters(), lr=1e-2)
    slimfx.train(cm, [_batch()], steps=1, optimizer=opt)
    state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}
    _interrupt_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        slimfx.train(cm, [_batch()], steps=3, optimizer=opt)
    after = opt.state_dict()["state"]
    assert after.keys() == state.keys()
    for k, s in state.items():
        assert float(after[k]["step"]) == float(s["step"]) == 1.0
        assert torch.equal(after[k]["exp_avg"], s["exp_avg"]) and torch.equal(after[k]["exp_avg_sq"], s["exp_avg_sq"])


def test_a_callers_optimizer_over_half_adapters_trains_on_after_a_stop():
    """Put back through load_state_dict, its moments were cast to the half adapters' fp16 (they
    train as float32 masters): the next call's AdamW failed on a dtype mismatch."""
    lm = tiny("llama")
    cm = slimfx.compile(lm, "adapt blocks.*.mlp.* lora rank=2 dtype=fp16", progress=False)
    opt = torch.optim.AdamW(cm.adapter_parameters(), lr=1e-3)
    slimfx.train(cm, [_batch()], steps=2, optimizer=opt)
    with pytest.raises(ValueError):
        slimfx.train(cm, [_batch(), _batch(pad=True)], steps=2, optimizer=opt)
    assert {v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"} == {torch.float32}
    assert len(slimfx.train(cm, [_batch()], steps=2, optimizer=opt).losses) == 2


def test_the_teachers_modes_come_back_per_submodule():
    lm, cm = _cm()
    teacher = lm.model.train()
    teacher.model.layers[0].eval()
    slimfx.train(cm, [_batch()], steps=1, loss="distill", teacher=teacher)
    assert teacher.training and teacher.model.layers[1].training
    assert not any(m.training for m in teacher.model.layers[0].modules())
    teacher.eval()


def test_numpy_steps_are_whole_numbers_and_an_lr_must_be_a_number():
    lm, cm = _cm()
    assert len(slimfx.train(cm, [_batch()], steps=np.int64(2), lr=1e-3).losses) == 2
    for lr in (True, "1e-3"):
        with pytest.raises(ValueError, match=f"lr must be a positive finite number, got {lr!r}"):
            slimfx.train(cm, [_batch()], steps=1, lr=lr)
