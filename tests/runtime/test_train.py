"""slimfx.train (runtime/train.py): training moves the adapters and nothing else, over float and
4-bit bases, with and without bf16 autocast; distillation; every refusal is a clear message."""
from __future__ import annotations

import contextlib

import functools

import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st

import slimfx
from runtime_tiny import compiled
from slimfx import models
from slimfx.runtime.adapters import is_adapter_param

# Each tiny compile costs seconds: a few rule sets, each compiled once per worker and reset.
MIXED = ("adapt blocks.*.attn.* : Linear lora rank=4 alpha=8", "adapt blocks.*.mlp.* : Linear dora rank=4 alpha=8")
QLORA = ("quantize blocks.*.** : Linear int4 group=16", "adapt blocks.*.** : Linear lora rank=4 alpha=8")


@functools.cache
def case(arch: str, *rules: str):
    """(LoadedModel, CompiledModel, its initial adapter values): compiled once per worker."""
    lm = models.tiny(arch)
    cm = slimfx.compile(lm, "policy p {\n" + "".join(f"    {r}\n" for r in rules) + "}\n")
    return lm, cm, {n: p.detach().clone() for n, p in cm.named_parameters() if is_adapter_param(n)}


def fresh(arch: str, *rules: str):
    """The cached compiled model with its adapters reset to their initial values."""
    lm, cm, initial = case(arch, *rules)
    with torch.no_grad():
        for n, p in cm.named_parameters():
            if n in initial:
                p.copy_(initial[n])
                p.grad = None
    return lm, cm


def tokens(batch: int, seq: int, *, pad: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[-1, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def frozen_state(cm) -> dict[str, torch.Tensor]:
    """Every non-adapter parameter and buffer (and plain tensor constant), cloned."""
    state = {n: t.detach().clone() for n, t in cm.state_dict(keep_vars=True).items() if not is_adapter_param(n)}
    assert state
    return state


def assert_unchanged(cm, before: dict[str, torch.Tensor]) -> None:
    after = {n: t for n, t in cm.state_dict().items() if not is_adapter_param(n)}
    assert after.keys() == before.keys()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"training changed non-adapter tensors {changed[:5]}"


def assert_only_adapters_got_gradients(cm) -> None:
    """After train(): no frozen weight holds a gradient, and the adapters' last ones are freed
    (they were held, as large as the adapters, for nothing)."""
    assert all(p.requires_grad == is_adapter_param(n) for n, p in cm.named_parameters())
    assert [n for n, p in cm.named_parameters() if p.grad is not None] == []


@settings(max_examples=4, deadline=None)
@given(arch=st.sampled_from(["llama", "gpt2"]), batch=st.integers(1, 2), seq=st.integers(4, 12),
       pad=st.booleans())
def test_training_lowers_the_loss_and_moves_only_adapters(arch, batch, seq, pad):
    lm, cm = fresh(arch, *MIXED)  # LoRA on attention, DoRA on the MLP
    before = frozen_state(cm)
    result = slimfx.train(cm, [tokens(batch, seq, pad=pad)], steps=6, lr=1e-2)
    assert len(result.losses) == 6 and result.last < result.first
    assert_unchanged(cm, before)
    assert_only_adapters_got_gradients(cm)
    assert cm.training is False  # the previous mode is back


def test_training_inside_no_grad_trains_as_outside_it():
    """Inside `with torch.no_grad():` (a compile with `heal method=lora` there too) autograd raised
    "element 0 of tensors does not require grad"."""
    batch = tokens(2, 8, pad=False)
    runs = []
    for context in (torch.no_grad, contextlib.nullcontext):
        torch.manual_seed(0)
        lm, cm = fresh("llama", *MIXED)
        with context():
            runs.append(slimfx.train(cm, [batch], steps=3, lr=1e-2).losses)
        assert torch.is_grad_enabled()
    assert runs[0] == runs[1] and runs[0][-1] < runs[0][0]
    lm = models.tiny("llama", layers=3)
    with torch.no_grad():
        cm = slimfx.compile(lm, "drop blocks[1]\nheal method=lora steps=2 lr=0.01 distill=true", calib=[batch])
    assert cm.report.rules[1].details


def test_lora_over_a_4_bit_base_trains_and_leaves_the_packed_weights_alone():
    lm, cm = fresh("llama", *QLORA)
    before = frozen_state(cm)
    assert any(t.dtype in (torch.uint8, torch.int8, torch.int32) for t in before.values())
    result = slimfx.train(cm, iter([tokens(2, 10, pad=True)]), steps=5, lr=1e-2)
    assert result.last < result.first
    assert_unchanged(cm, before)
    assert_only_adapters_got_gradients(cm)


@pytest.mark.parametrize("rules", [MIXED, QLORA], ids=["float", "int4"])
def test_bf16_autocast_around_training(rules):
    lm, cm = fresh("llama", *rules)
    before = frozen_state(cm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = slimfx.train(cm, [tokens(2, 8, pad=False)], steps=5, lr=1e-2)
    # Every step must see the updated adapters, not autocast's cached bf16 copy of step 1.
    assert len(set(result.losses)) == 5 and result.last < result.first
    assert all(p.dtype == torch.float32 for p in cm.adapter_parameters())
    assert_unchanged(cm, before)


@pytest.mark.parametrize("model_dtype, method", [(torch.bfloat16, "lora"), (torch.float16, "dora")])
def test_half_adapters_on_a_model_of_their_own_dtype_train(model_dtype, method):
    """Stored in the activations' dtype, A and B were read directly; training swaps them for
    float32 masters, and the linear on half activations raised a raw dtype mismatch."""
    lm = models.tiny("llama")
    lm.model.to(model_dtype)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[model_dtype]
    cm = slimfx.compile(lm, f"adapt blocks.*.attn.{{q,v}} {method} rank=4 alpha=8 dtype={name}")
    stored = [p.dtype for p in cm.adapter_parameters()]
    assert model_dtype in stored  # A and B (DoRA's magnitude is float32)
    with torch.no_grad():
        before = cm(**tokens(2, 8, pad=True)).logits
    result = slimfx.train(cm, [tokens(2, 8, pad=True)], steps=3, lr=1e-2)
    assert result.last < result.first
    assert [p.dtype for p in cm.adapter_parameters()] == stored
    with torch.no_grad():
        assert not torch.equal(cm(**tokens(2, 8, pad=True)).logits, before)


def test_distill_against_the_original_lowers_the_kl():
    lm, cm = fresh("llama", *QLORA)
    # The 4-bit error is small: a gentle lr, or the first step overshoots it.
    result = slimfx.train(cm, [tokens(2, 8, pad=True)], steps=6, lr=1e-3, loss="distill", teacher=lm)
    assert result.first > 0 and result.last < result.first
    assert lm.model.training is False


def test_distill_without_logits_matches_the_first_output_and_lm_loss_says_so():
    lm, cm = fresh("bert", *QLORA)
    result = slimfx.train(cm, [tokens(2, 8, pad=True)], steps=4, lr=1e-3, loss="distill", teacher=lm.model)
    assert 0 < result.last < result.first
    with pytest.raises(ValueError, match="loss='distill'"):
        slimfx.train(cm, [tokens(2, 8, pad=False)], steps=1)


def test_a_given_optimizer_is_used():
    lm, cm = fresh("llama", *MIXED)
    opt = torch.optim.SGD(cm.adapter_parameters(), lr=0.0)
    result = slimfx.train(cm, [tokens(1, 6, pad=False)], steps=3, optimizer=opt)
    assert result.losses == [result.first] * 3  # lr 0: nothing moved


class _RecordingSGD(torch.optim.SGD):
    """SGD that notes the lr of its group at every step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen: list[float] = []

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


def _torch_cosine_lrs(lr: float, steps: int) -> list[float]:
    """The same schedule as torch's own schedulers give it: linear warm-up over steps // 20 (at
    least 1) steps from lr/warmup, then cosine annealing to 0 over the remaining steps."""
    warmup = max(1, steps // 20)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1)),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=0.0)], milestones=[warmup])
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("steps", [3, 40, 61])
def test_the_cosine_schedule_is_torchs_warmup_then_cosine_annealing(steps):
    from slimfx.runtime.train import lr_factor

    ours = [0.5 * lr_factor("cosine", i, steps) for i in range(steps)]
    assert ours == pytest.approx(_torch_cosine_lrs(0.5, steps), abs=1e-12)
    assert [lr_factor("constant", i, steps) for i in range(steps)] == [1.0] * steps


def test_train_steps_with_the_scheduled_lr_and_gives_the_optimizer_its_lr_back():
    from slimfx.runtime.train import lr_factor

    lm, cm = fresh("llama", *MIXED)
    opt = _RecordingSGD(cm.adapter_parameters(), lr=0.1)
    slimfx.train(cm, [tokens(1, 6, pad=False)], steps=40, optimizer=opt, schedule="cosine")
    assert opt.seen == pytest.approx([0.1 * lr_factor("cosine", i, 40) for i in range(40)])
    assert opt.seen[0] == pytest.approx(0.05) and opt.seen[-1] < 0.001 and max(opt.seen) == pytest.approx(0.1)
    assert opt.param_groups[0]["lr"] == 0.1
    opt.seen.clear()
    slimfx.train(cm, [tokens(1, 6, pad=False)], steps=3, optimizer=opt)  # constant by default
    assert opt.seen == [0.1] * 3


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=0), ValueError, "steps must be"),
    (dict(steps=2, loss="mse"), ValueError, "unknown loss 'mse'"),
    (dict(steps=2, loss="distill"), ValueError, "needs a teacher"),
    (dict(steps=2, schedule="linear"), ValueError, "unknown schedule 'linear'"),
    (dict(steps=1, lr=float("inf")), ValueError, "lr must be a positive finite number, got inf"),
    (dict(steps=1, lr=0.0), ValueError, "lr must be a positive finite number, got 0.0"),
    # both ran without a word: the optimizer stepped with its own lr, the lm loss had no teacher
    (dict(steps=1, lr=0.1, optimizer="sgd"), ValueError, r"lr=0\.1 and optimizer= were both given.*set it there"),
    (dict(steps=1, teacher="original"), ValueError, r"teacher= is for loss='distill'"),
])
def test_argument_errors(kwargs, error, match):
    lm, cm = fresh("llama", *MIXED)
    if kwargs.get("optimizer") == "sgd":
        kwargs = dict(kwargs, optimizer=torch.optim.SGD(cm.adapter_parameters(), lr=0.0))
    if kwargs.get("teacher") == "original":
        kwargs = dict(kwargs, teacher=lm.model)
    with pytest.raises(error, match=match):
        slimfx.train(cm, [tokens(1, 4, pad=False)], **kwargs)


def test_a_last_update_that_leaves_the_adapters_not_finite_raises():
    """Every step's loss is checked before its update; the last update has no step after it, so
    an lr of 1e30 once returned normally with adapters whose outputs were nan (and `slimfx train`
    saved them)."""
    lm, cm = fresh("llama", *MIXED)
    with pytest.raises(FloatingPointError, match=r"after step 1's update the lm loss is nan: training diverged"):
        slimfx.train(cm, [tokens(1, 4, pad=False)], steps=1, lr=1e30)


@pytest.mark.parametrize("steps", [1, 3])
def test_training_that_diverges_restores_the_adapters(steps):
    """Step 1's update wrecked the adapters and step 2's loss was nan: the message said the adapters
    were not updated, and every later call, save and train gave nan."""
    lm, cm = fresh("llama", *MIXED)
    batch = tokens(1, 4, pad=False)
    before = {n: p.detach().clone() for n, p in cm.named_parameters() if p.requires_grad}
    with torch.no_grad():
        want = cm(**batch).logits
    with pytest.raises(FloatingPointError, match=r"(at step 2|after step 1's update).*training diverged \(try a "
                                                 r"lower lr\); the adapters are restored"):
        slimfx.train(cm, [batch], steps=steps, lr=1e30)
    assert all(torch.equal(p, before[n]) for n, p in cm.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(cm(**batch).logits, want)
    slimfx.train(cm, [batch], steps=2, lr=1e-4)  # and it trains again


@pytest.mark.parametrize("lr", [1e39, 3e38])
def test_an_lr_whose_step_overflows_float32_is_a_divergence_and_restores_the_adapters(lr):
    """AdamW's step size lr/(1−β₁ᵗ) has no float32 value: torch raised "value cannot be converted
    to type float without overflow" mid-update, a raw RuntimeError (`slimfx train --lr 1e39` called
    it a slimfx bug; `heal method=lora lr=1e39` too)."""
    lm, cm = fresh("llama", *MIXED)
    batch = tokens(1, 4, pad=False)
    before = {n: p.detach().clone() for n, p in cm.named_parameters() if p.requires_grad}
    with pytest.raises(FloatingPointError, match=r"step 1's update overflows float32 .*training diverged \(try a "
                                                 r"lower lr\); the adapters are restored") as info:
        slimfx.train(cm, [batch], steps=2, lr=lr)
    assert info.value.updated
    assert all(torch.equal(p, before[n]) for n, p in cm.named_parameters() if p.requires_grad)


def test_a_model_without_adapters_is_refused():
    case_ = compiled("llama")
    with pytest.raises(ValueError, match="compile with an `adapt` rule"):
        slimfx.train(case_.cm, [case_.loaded.example_inputs], steps=1)
    with pytest.raises(TypeError, match="takes a CompiledModel"):
        slimfx.train(case_.loaded.model, [case_.loaded.example_inputs], steps=1)


def test_bad_batches_are_refused_and_the_mode_is_restored_after_an_error():
    lm, cm = fresh("llama", *MIXED)
    with pytest.raises(ValueError, match="batches is empty"):
        slimfx.train(cm, [], steps=1)
    with pytest.raises(TypeError, match=r"batches\[0\]"):
        slimfx.train(cm, [torch.zeros(2, 3)], steps=1)
    with pytest.raises(TypeError, match="unexpected"):
        slimfx.train(cm, [{**tokens(1, 4, pad=False), "pixels": torch.zeros(1)}], steps=1)
    assert cm.training is False
    cm.train()
    with pytest.raises(TypeError):
        slimfx.train(cm, [{"nope": torch.zeros(1)}], steps=1)
    assert cm.training is True
    cm.eval()


def test_a_model_with_token_rules_is_refused_with_what_to_do():
    lm = models.tiny("llama", layers=2)
    example = {"input_ids": torch.randint(3, 200, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    cm = slimfx.compile(lm.model, "adapt blocks.*.attn.q lora rank=4\ntokens unpad", example_inputs=example,
                        calib=[example])
    with pytest.raises(ValueError, match=r"tokens …` rules.*slimfx::pack_tokens.*merge_adapters"):
        slimfx.train(cm, [example], steps=1)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_the_route_the_token_refusal_names_works(arch):
    """Train without the token rules, merge, compile the token rules onto the result: that call
    failed on every model ("the residual stream … has no batch and sequence dims")."""
    lm = models.tiny(arch, layers=2)
    example = tokens(2, 6, pad=True)
    cm = slimfx.compile(lm.model, "adapt blocks.*.** : Linear lora rank=4 alpha=8", example_inputs=example,
                        calib=[example])
    with torch.no_grad():  # fresh adapters (B = 0) leave nothing to distil: give them a start
        for p in cm.adapter_parameters():
            p.add_(0.05)
    slimfx.train(cm, [example], steps=2, lr=1e-2, loss="distill", teacher=lm.model)
    merged = cm.merge_adapters()
    unpadded = slimfx.compile(merged, "tokens unpad", calib=[example])
    batch = tokens(3, 7, pad=True, seed=1)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        want, got = (m(**batch)[0] for m in (merged, unpadded))
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)


def test_a_stream_of_batches_is_read_as_the_steps_need_it():
    """train() read the whole iterable before step 1: an endless stream never returned."""
    lm, cm = fresh("llama", *QLORA)
    pulled = []

    def stream():
        for i in range(10**6):
            pulled.append(i)
            yield tokens(2, 6, pad=True, seed=i)

    result = slimfx.train(cm, stream(), steps=3, lr=1e-3)
    assert len(result.losses) == 3 and len(pulled) == 3


def test_an_iterable_starts_a_new_pass_and_an_iterator_repeats_what_it_gave():
    class Epochs:  # a DataLoader-like iterable: each pass a fresh iterator
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([tokens(1, 5, pad=False, seed=0), tokens(1, 5, pad=False, seed=1)])

    lm, cm = fresh("llama", *QLORA)
    epochs = Epochs()
    slimfx.train(cm, epochs, steps=5, lr=1e-3)
    assert epochs.passes == 3
    from slimfx.runtime import train as T

    batches = T._batches(iter([{"input_ids": torch.ones(1, 2)}, {"input_ids": torch.zeros(1, 2)}]))
    assert [float(next(batches)["input_ids"].sum()) for _ in range(5)] == [2.0, 0.0, 2.0, 0.0, 2.0]

    class Empty:
        def __iter__(self):
            return iter([])

    for empty in ([], iter([]), Empty()):
        with pytest.raises(ValueError, match="batches is empty"):
            slimfx.train(cm, empty, steps=1)
    with pytest.raises(TypeError, match=r"batches\[1\] is a str"):
        slimfx.train(cm, iter([tokens(1, 5, pad=False), "text"]), steps=2)


def test_int32_token_ids_train_with_the_lm_loss():
    """The model takes int32 ids; cross_entropy took no int32 targets ("expected target dtype to
    be Long or Byte, but got Int"), from input_ids or from labels."""
    lm, cm = fresh("llama", *QLORA)
    batch = tokens(2, 8, pad=True)
    ids = batch["input_ids"].int()
    as_long = slimfx.train(cm, [batch], steps=1, lr=1e-3).losses
    lm, cm = fresh("llama", *QLORA)
    assert slimfx.train(cm, [dict(batch, input_ids=ids)], steps=1, lr=1e-3).losses == as_long
    lm, cm = fresh("llama", *QLORA)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100).int()
    assert slimfx.train(cm, [dict(batch, labels=labels)], steps=1, lr=1e-3).losses == pytest.approx(as_long)


def test_inference_mode_is_refused_with_what_to_do():
    lm, cm = fresh("llama", *QLORA)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch.inference_mode\(\) is on: call it outside"):
        slimfx.train(cm, [tokens(1, 5, pad=False)], steps=1)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_distilling_a_model_that_is_its_teacher_is_refused_before_any_update(arch):
    """Fresh adapters on an otherwise unchanged model: the loss is 0, so BERT's adapters never
    moved and Llama's trained on round-off noise, with nothing said."""
    from slimfx.runtime.train import NothingToDistil

    lm, cm = fresh(arch, "adapt blocks.*.attn.* : Linear lora rank=4 alpha=8")
    before = {n: p.detach().clone() for n, p in cm.named_parameters() if p.requires_grad}
    with pytest.raises(NothingToDistil, match="nothing to distil"):
        slimfx.train(cm, [tokens(2, 6, pad=True)], steps=3, lr=1e-2, loss="distill", teacher=lm.model)
    assert all(torch.equal(p, before[n]) for n, p in cm.named_parameters() if p.requires_grad)


def test_a_loss_that_is_not_finite_before_any_update_does_not_blame_the_lr():
    """The first loss is not finite: no update came before it, so 'training diverged (try a
    lower lr)' was false."""
    lm, cm = fresh("llama", *MIXED)
    batch = tokens(1, 4, pad=False)

    class NanTeacher(torch.nn.Module):
        def forward(self, **inputs):
            out = lm.model(**inputs)
            out.logits = out.logits * float("nan")
            return out

    with pytest.raises(FloatingPointError, match=r"the distill loss is nan at step 1: before any update, so not the "
                                                 r"lr: .*not finite; the adapters are restored"):
        slimfx.train(cm, [batch], steps=2, loss="distill", teacher=NanTeacher())


def test_the_teacher_is_called_with_the_flags_the_student_was_captured_with():
    """The student ran with scale=2.0 and the original teacher with forward's scale=1.0: the loss
    of fresh adapters against their own original was 0.23, not 0, and training chased it."""
    from slimfx.runtime.train import NothingToDistil

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8)

        def forward(self, input_ids, scale: float = 1.0):
            return self.out(self.embed(input_ids)) * scale

    torch.manual_seed(0)
    model, ids = Scaled().eval(), torch.randint(0, 50, (2, 6))
    cm = slimfx.compile(model, "adapt out lora rank=2 alpha=4", example_inputs={"input_ids": ids, "scale": 2.0})
    with pytest.raises(NothingToDistil):
        slimfx.train(cm, [{"input_ids": ids}], steps=2, loss="distill", teacher=model)
