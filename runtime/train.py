"""Training a compiled model's adapters: after `adapt` rules (passes/adapters/) the LoRA/DoRA
parameters are the only trainable ones (runtime/adapters.py); this is the plain loop that trains
them, beside frozen (possibly 4-bit) base weights: QLoRA.

    cm = slimfx.compile(lm, "policy p { adapt blocks.*.attn.{q,v} lora rank=16 alpha=32 }")
    result = slimfx.train(cm, [lm.encode(texts)], steps=8)
    result.losses      # one float per step; result.first, result.last
    cm.save("out/trained")
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import numbers
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .losses import distill_loss, lm_loss, reads_later_tokens
from .token_ids import token_ids_name
from .lower import unlowered
from .masters import float32_masters
from .progress import Progress

__all__ = ["Diverged", "train", "TrainResult", "LOSSES", "SCHEDULES", "float32_masters", "module_mode",
           "lr_factor"]

LOSSES = ("lm", "distill")
# "constant": `lr` at every step. "cosine": a linear warm-up over the first 5% of the steps, then a
# cosine decay towards 0 at the last step, so the last updates are small ones that settle rather than
# the full-size steps that make a constant lr's loss wander at the end.
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainResult:
    """What one `train` call did: the loss at every step (before that step's update)."""

    losses: list[float]
    seconds: float
    loss: str

    @property
    def first(self) -> float:
        return self.losses[0]

    @property
    def last(self) -> float:
        return self.losses[-1]

    def __str__(self) -> str:
        # four significant digits: a distill loss of 6.6e-07 read "0.0000"
        return (f"{len(self.losses)} step{'' if len(self.losses) == 1 else 's'} of {self.loss} loss in {self.seconds:.1f}s: "
                f"{self.first:#.4g} -> {self.last:#.4g}")


DEFAULT_LR = 3e-4


def train(cm, batches, *, steps: int, lr: float | None = None, loss: str = "lm", teacher=None,
          progress: bool | Progress = False, optimizer: torch.optim.Optimizer | None = None,
          schedule: str = "constant") -> TrainResult:
    """Train `cm`'s adapters for `steps` optimizer steps over `batches` (input dicts, cycled).

    loss="lm": next-token cross entropy on `.logits`, padding (attention_mask == 0) and labels of
    -100 ignored; a batch may carry `labels` (Hugging Face's convention) instead of scoring its
    input_ids. loss="distill": KL(teacher ‖ student) on the logits, or the MSE of the first output
    tensor (e.g. last_hidden_state) for a model without logits; `teacher` (the original module or
    another CompiledModel, for this loss only) runs in eval mode under no_grad. AdamW with `lr`
    (default 3e-4) over `cm.adapter_parameters()`, unless `optimizer` is given (with its own lr).
    `schedule` scales every step's lr (SCHEDULES; "cosine": warm-up, then decay towards 0; the
    optimizer's own lr is restored afterwards). `cm` is in training mode
    (adapter dropout on) only while this runs.
    Adapters stored in fp16/bf16 (`adapt … dtype=`) train as float32 and are rounded back at the
    end (`float32_masters`).
    """
    params = _check(cm, steps, loss, teacher)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; train() knows {', '.join(map(repr, SCHEDULES))}")
    if optimizer is not None and lr is not None:  # the optimizer stepped with its own lr, silently
        raise ValueError(f"lr={lr!r} and optimizer= were both given, and the optimizer steps with its own "
                         "lr: set it there, or leave optimizer out")
    lr = DEFAULT_LR if lr is None else lr
    if optimizer is None and (isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < float("inf")):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if optimizer is not None:
        _check_optimizer(optimizer, params)
    batches = _batches(batches)
    teacher = _unwrap(teacher)
    if teacher is not None and not callable(teacher):  # it failed at step 1: "'str' object is not callable"
        raise TypeError(f"teacher= is the model to learn from: the original module, a CompiledModel, a model from "
                        f"slimfx.models.load, or a function of the inputs; got the {type(teacher).__name__} {teacher!r:.60}")
    opt = optimizer if optimizer is not None else torch.optim.AdamW(params, lr=lr)
    bars = progress if isinstance(progress, Progress) else Progress.for_terminal(progress)
    losses: list[float] = []
    setup = _LossSetup.of(cm)
    if loss == "lm":
        first = next(batches)
        batches = itertools.chain([first], batches)
        _check_causal(cm, first, setup)
    start = time.perf_counter()
    # Generated Triton kernels have no backward: a model on that backend trains on its reference
    # graph (the same weights), and its kernels are back afterwards.
    reference = unlowered(cm.program) if getattr(cm, "backend", None) == "triton" else contextlib.nullcontext()
    # A loss that is not finite comes from the updates before it (an lr of 1e30 wrecks the adapters
    # at step 1, and step 2's loss is nan): the adapters go back to what they were at the start.
    before = [p.detach().clone() for p in params]
    # A caller's optimizer goes back too: its moments and step counts would count the undone
    # updates (the next call then stepped from state of adapters that no longer exist).
    opt_before = _optimizer_state(optimizer) if optimizer is not None else None
    try:
        # enable_grad: a caller's `with torch.no_grad():` (compile() inside one runs `heal method=lora`
        # here) left no graph to backpropagate, and autograd's own error named no cause.
        with torch.enable_grad(), reference, float32_masters(params), module_mode(cm, True), \
                module_mode(teacher, False), scaled_lr(opt) as scale, \
                bars.task(f"training adapters ({loss})", total=steps) as step:
            for i, batch in zip(range(steps), batches):
                scale(lr_factor(schedule, i, steps))
                value = _step(cm, batch, opt, loss, teacher, i, setup)
                losses.append(value)
                step(note=f"loss {value:#.4g}")
            # A step's loss is checked before its update; the last update has no step after it, so
            # one more forward (no gradient) checks what it left: an lr of 1e30 left finite adapters
            # whose outputs were nan.
            with torch.no_grad():
                after = _loss(cm, batch, loss, teacher, setup)
            if not torch.isfinite(after):
                raise FloatingPointError(f"after step {len(losses)}'s update the {loss} loss is {after.item()}")
    except Diverged:
        _put_back(params, before, optimizer, opt_before)
        raise
    except FloatingPointError as e:
        _put_back(params, before, optimizer, opt_before)
        raise Diverged(str(e), updated=bool(losses)) from None
    except BaseException as e:
        # Any other stop (a bad later batch, Ctrl-C) came after some updates: the call trains
        # fully or leaves the adapters as they were, never half-trained with no result.
        _put_back(params, before, optimizer, opt_before)
        if losses and hasattr(e, "add_note"):  # Python 3.11+; pyproject allows 3.10
            e.add_note(f"slimfx.train stopped after {len(losses)} of {steps} steps; the adapters are restored to "
                       "what they were before this train() call")
        raise
    finally:
        for p in params:  # the last step's gradients, as large as the adapters, were held for nothing
            p.grad = None
    return TrainResult(losses, time.perf_counter() - start, loss)


def _put_back(params: list[nn.Parameter], before: list[torch.Tensor], optimizer=None, opt_before=None) -> None:
    with torch.no_grad():
        for p, value in zip(params, before):
            p.copy_(value)
    if optimizer is not None:
        state, groups = opt_before
        optimizer.state.clear()
        optimizer.state.update(state)
        for group, saved in zip(optimizer.param_groups, groups):
            group.update(saved)


def _check_optimizer(optimizer, params: list[nn.Parameter]) -> None:
    if isinstance(optimizer, type) or not hasattr(optimizer, "param_groups"):
        raise TypeError(f"optimizer= takes an optimizer built over the adapters, e.g. "
                        f"torch.optim.AdamW(cm.adapter_parameters(), lr=1e-4); got {optimizer!r:.80}")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not any(id(p) in held for p in params):  # it stepped other tensors, and the model stayed as it was
        raise ValueError("optimizer= holds none of this model's adapters: build it over cm.adapter_parameters() "
                         "of the model you train (a copy or a loaded artifact has adapters of its own)")


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    """Per parameter its state (moments, step) as it is, and each group's settings. Not
    state_dict()/load_state_dict(): loading casts the moments to the parameters' dtype, fp16 for
    half adapters once float32_masters has rounded them back, and the next call's AdamW failed."""
    return ({p: copy.deepcopy(s) for p, s in optimizer.state.items()},
            [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups])


class Diverged(FloatingPointError):
    """A loss that is not finite. `what`: which loss, where; `updated`: whether any update came
    before it (else the model's or the teacher's outputs on the batch are not finite, whatever
    the lr). The message says so, and that the adapters are back to what they were."""

    def __init__(self, what: str, *, updated: bool):
        self.what, self.updated = what, updated
        cause = ("training diverged (try a lower lr)" if updated else
                 "before any update, so not the lr: the model's (or the teacher's) outputs on this batch are not finite")
        super().__init__(f"{what}: {cause}; the adapters are restored to what they were before this train() call")


def lr_factor(schedule: str, i: int, steps: int) -> float:
    """The fraction of the lr that step `i` (0-based) of `steps` takes under `schedule`."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, steps // 20)
    if i < warmup:
        return (i + 1) / warmup
    # Over (steps - warmup), not one less: the last step still moves (a little), none is wasted at 0.
    return 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / (steps - warmup)))


@contextmanager
def scaled_lr(opt: torch.optim.Optimizer):
    """Inside, `scale(f)` sets each parameter group's lr to f × its lr on entry; the lrs on entry
    are back afterwards, also on an exception (a caller's optimizer is theirs to reuse)."""
    base = [g["lr"] for g in opt.param_groups]

    def scale(factor: float) -> None:
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * factor

    try:
        yield scale
    finally:
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr


def _check(cm, steps: int, loss: str, teacher) -> list[nn.Parameter]:
    if not hasattr(cm, "adapter_parameters"):
        raise TypeError(f"train() takes a CompiledModel (from slimfx.compile or slimfx.load); "
                        f"got {type(cm).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; train() knows {', '.join(map(repr, LOSSES))}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:  # numpy ints too
        raise ValueError(f"steps must be a whole number of at least 1, got {steps!r}")
    if torch.is_inference_mode_enabled():  # enable_grad() does not lift it: autograd's error named no cause
        raise RuntimeError("slimfx.train runs backward passes, and torch.inference_mode() is on: call it outside "
                           "`with torch.inference_mode():` (inside torch.no_grad() is fine: training turns "
                           "gradients on)")
    if loss == "lm" and teacher is not None:  # it ran with no teacher, and no word of it
        raise ValueError("teacher= is for loss='distill'; loss='lm' learns the batches' own tokens: "
                         "pass loss='distill' to learn the teacher's outputs, or leave teacher out")
    if loss == "distill" and teacher is None:
        raise ValueError("loss='distill' needs a teacher: the original model (or another "
                         "CompiledModel) whose outputs the student learns to match")
    params = cm.adapter_parameters()
    if not params:
        raise ValueError(f"{type(cm).__name__} has no adapters to train: compile with an `adapt` "
                         "rule, e.g. `adapt blocks.*.attn.{q,v} lora rank=16 alpha=32`")
    if not any(p.requires_grad for p in params):  # autograd said only "element 0 … does not require grad"
        raise ValueError("every adapter of this model is frozen (requires_grad=False), so no step could move one: "
                         "unfreeze those to train, `for p in cm.adapter_parameters(): p.requires_grad_(True)`")
    token_nodes = _token_op_nodes(cm)
    if token_nodes:
        raise ValueError(f"this model was compiled with `tokens …` rules, and their ops ({token_nodes[0]}, …) "
                         "have no gradients: train a model compiled without them, then compile the token rules "
                         "onto the result (e.g. `slimfx.compile(cm.merge_adapters(), \"tokens unpad\")`)")
    return params


def _token_op_nodes(cm) -> list[str]:
    """The token pass's ops (inference only) in the model's graph."""
    from torch import fx

    from .token_ops import token_ops_in

    modules = cm.modules() if isinstance(cm, nn.Module) else ()
    return [op for m in modules if isinstance(m, fx.GraphModule) for op in token_ops_in(m)]


class NothingToDistil(ValueError):
    """loss='distill' on a student that is its teacher: the first loss is 0 and no step would move."""


_NOTHING_TO_DISTIL = (
    "loss='distill': the student's outputs equal the teacher's on the first batch (loss 0), so there is "
    "nothing to distil: fresh adapters add nothing (B = 0) and the model is otherwise the teacher. Distil "
    "after rules that change the model (quantize, drop/collapse), or train with loss='lm' on text")
_EMPTY = "batches is empty; pass at least one input dict, e.g. [lm.encode(texts)]"


def _batches(batches) -> Iterator[dict[str, Any]]:
    """Batches, cycled for as many steps as asked. One dict is one batch; a list or tuple is checked
    up front; any other iterable is read as the steps need it (a stream need not end): one that
    can be iterated again (a DataLoader) starts a new pass when it ends, reshuffled if it
    shuffles; an iterator's (a generator's) batches are kept and repeated once it runs out."""
    if isinstance(batches, Mapping):
        batches = [batches]
    if isinstance(batches, (list, tuple)):
        items = [_checked(b, i) for i, b in enumerate(batches)]
        if not items:
            raise ValueError(_EMPTY)
        return itertools.cycle(items)
    if not isinstance(batches, Iterable):
        raise TypeError(f"batches must be a list of input dicts (or an iterable of them); got {type(batches).__name__}")
    if isinstance(batches, Iterator):
        return itertools.cycle(_one_pass(batches))
    return itertools.chain.from_iterable(_one_pass(batches) for _ in itertools.count())


def _one_pass(batches: Iterable) -> Iterator[dict[str, Any]]:
    i = -1
    for i, b in enumerate(batches):
        yield _checked(b, i)
    if i < 0:
        raise ValueError(_EMPTY)


def _checked(b, i: int) -> dict[str, Any]:
    if not isinstance(b, Mapping):
        raise TypeError(f"batches[{i}] is a {type(b).__name__}; each batch is a dict of input tensors "
                        "(e.g. {'input_ids': ..., 'attention_mask': ...})")
    return dict(b)


def _unwrap(teacher):
    """A slimfx.models.LoadedModel stands for its module."""
    inner = getattr(teacher, "model", None)
    return inner if not isinstance(teacher, nn.Module) and isinstance(inner, nn.Module) else teacher


@contextmanager
def module_mode(module: nn.Module | None, training: bool):
    """`module` in training (or eval) mode inside, its previous mode restored after, also on an
    exception; nothing to do for no teacher (or a plain function)."""
    if not isinstance(module, nn.Module):
        yield
        return
    # Each submodule's own flag: train(was) set the top module's on all of them (a teacher with
    # one block in eval came back with every block training).
    was = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        yield
    finally:
        module.train(was[module])  # its own train(): a CompiledModel switches adapter dropout there
        for m, mode in was.items():
            m.training = mode


def _step(cm, batch: dict, opt, loss: str, teacher, i: int, setup: "_LossSetup") -> float:
    # Autocast caches its low-precision copy of each trainable leaf (the adapters) until the
    # caller's `with torch.autocast` ends; without this, every step would reuse step 1's copy.
    torch.clear_autocast_cache()
    opt.zero_grad(set_to_none=True)
    value = _loss(cm, batch, loss, teacher, setup)
    if not torch.isfinite(value):
        raise FloatingPointError(f"the {loss} loss is {value.item()} at step {i + 1}")
    if i == 0 and loss == "distill" and value.item() == 0.0:  # before any update: the adapters stay as they are
        raise NothingToDistil(_NOTHING_TO_DISTIL)
    value.backward()
    try:
        opt.step()
    except RuntimeError as e:
        # lr=1e39: AdamW's step size lr/(1−β₁ᵗ) has no float32 value, and torch says "value cannot
        # be converted to type float without overflow" mid-update (the adapters are put back)
        if "overflow" not in str(e):
            raise
        raise Diverged(f"step {i + 1}'s update overflows float32 ({e})", updated=True) from None
    return value.item()


# ---------------------------------------------------------------- the loss of one step

@dataclass(frozen=True)
class _LossSetup:
    """What every step's loss reads of `cm`'s graph, found once per train() call (the token ids
    walk the whole graph)."""

    student_flags: dict  # _flags_set_away
    # the flags the graph was captured with (scale=2.0), for the teacher: with forward's
    # defaults the original computed another function, and the student was pulled towards it
    teacher_flags: dict
    ids: str  # the input holding the token ids (runtime/token_ids.py)
    # `labels` go to a graph captured with them (a Hugging Face training batch), else only to the loss
    takes_labels: bool

    @classmethod
    def of(cls, cm) -> "_LossSetup":
        program = getattr(cm, "graph", None)
        inputs = getattr(program, "inputs", None)
        return cls(_flags_set_away(cm), dict(getattr(getattr(program, "call", None), "flags", ())),
                   token_ids_name(program) if inputs is not None else "input_ids",
                   any(i.name == "labels" for i in inputs or ()))

    def student_inputs(self, batch: dict) -> dict:
        return {**self.student_flags, **{k: v for k, v in batch.items() if k != "labels" or self.takes_labels}}


def _loss(cm, batch: dict, loss: str, teacher, setup: _LossSetup) -> torch.Tensor:
    out = cm(**setup.student_inputs(batch))
    if loss == "lm":
        return lm_loss(out, batch, setup.ids)
    return distill_loss(out, teacher, {k: v for k, v in batch.items() if k != "labels"}, setup.teacher_flags)


def _check_causal(cm, batch: dict, setup: _LossSetup) -> None:
    """Refuse loss='lm' on a model whose positions read later tokens: it learns to copy them. A
    Hugging Face generating model is causal by its class; any other is probed on the first batch
    (two forwards, adapter dropout off)."""
    modules = getattr(getattr(cm, "graph", None), "modules", None)
    root = modules.get("") if isinstance(modules, Mapping) else None
    if root is not None and "GenerationMixin" in root.classes:
        return
    with module_mode(cm, False):
        later = reads_later_tokens(cm, setup.student_inputs(batch), setup.ids)
    if later:
        raise ValueError("loss='lm' is next-token cross entropy, and this model's outputs at a position read the "
                         "tokens after it (a bidirectional model, e.g. a masked LM): it would learn to copy the "
                         "next token it sees. Train with loss='distill' and the original model as teacher")


def _flags_set_away(cm) -> dict:
    """The non-tensor flags the graph was captured with away from forward's own default (batches
    hold tensors, and such a flag may not be left out of a call); none for a graph without them."""
    call = getattr(getattr(cm, "graph", None), "call", None)
    if call is None:
        return {}
    flags = dict(call.flags)
    return {name: flags[name] for name, _ in getattr(call, "declared", ()) if name in flags}
