"""`check_policy`: the property test users run on their own policies (re-exported by slimfx.testing).

    from slimfx.models import tiny
    from slimfx.testing import check_policy

    def test_int8_policy_keeps_logits():
        check_policy(tiny("llama"), "policy p {\\n quantize blocks.*.** : Linear int8\\n}\\n",
                     atol=0.02, rtol=0.0)

The model is compiled once; hypothesis then draws batch sizes, sequence lengths and padding (masks
with zeros at the left or right end, or none), builds inputs like the example inputs, and compares
the compiled model with the original on each draw. A failure is shrunk to the smallest input that
still fails and reported with its error.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import random
from typing import Any, Callable, Mapping

import torch
from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings, strategies as st
from hypothesis.control import current_build_context, currently_in_test_context
from torch import fx, nn

from .passes.capture import bind_inputs, eval_mode
from .policy_compare import MetricReturnError, callable_name, metric_result, structure_problem, tolerance_problem

__all__ = ["check_policy", "PolicyCheckError", "PolicyCheckResult", "Draw", "DrawResult"]

PADDINGS = ("none", "right", "left")  # "none" first: hypothesis shrinks towards it
IGNORE_INDEX = -100  # the label of a position the loss skips (torch's cross_entropy, Hugging Face)
_MAX_SEED = 2**31 - 1


# ---- what is drawn -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Draw:
    """One drawn input: batch, sequence length (None when no input has one), padding side and the
    number of padded (mask = 0) positions per row, the seed of the token ids / float values, and
    the name of the mask input padding is written into (None: the model takes none)."""

    batch: int
    seq: int | None
    padding: str  # "none" | "left" | "right"
    pads: tuple[int, ...]
    seed: int
    mask: str | None = "attention_mask"

    def describe(self) -> str:
        parts = [f"batch={self.batch}"]
        if self.seq is not None:
            parts.append(f"seq={self.seq}")
            if self.mask is None:
                pass  # nothing to pad: no word about a mask the model does not take
            elif self.padding == "none":
                parts.append(f"padding=none ({self.mask} all ones)")
            else:
                parts.append(f"padding={self.padding} (masked positions per row: {list(self.pads)})")
        parts.append(f"seed={self.seed}")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class DrawResult:
    draw: Draw
    ok: bool
    value: float  # max |compiled - original| over compared elements, or the metric's value


@dataclasses.dataclass
class PolicyCheckResult:
    """What a passing check_policy saw: the compiled model and every input it tried."""

    compiled: Any  # the CompiledModel
    results: list[DrawResult]

    @property
    def draws(self) -> list[Draw]:
        return [r.draw for r in self.results]

    @property
    def max_value(self) -> float:
        """The largest error (or metric value) over every draw."""
        return max((r.value for r in self.results), default=0.0)


class PolicyCheckError(AssertionError):
    """check_policy found an input on which the compiled model departs from the original.
    `.draw` is the smallest such input hypothesis found, `.value` its error or metric value,
    `.inputs` the tensors of that input (call both models with them to look closer), `.seed` the
    seed that replays the run (`check_policy(..., seed=...)`; None inside an outer @given)."""

    def __init__(self, message: str, draw: Draw | None = None, value: float | None = None,
                 inputs: dict[str, torch.Tensor] | None = None, seed: int | None = None):
        super().__init__(message)
        self.draw, self.value, self.inputs, self.seed = draw, value, inputs, seed


class _Failure(AssertionError):
    """Raised inside the hypothesis test (one raise site, so hypothesis sees a single bug)."""

    def __init__(self, draw: Draw, detail: str, value: float):
        super().__init__(f"{draw.describe()}: {detail}")
        self.draw, self.detail, self.value = draw, detail, value


# ---- how inputs are built ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Input:
    name: str
    kind: str  # "mask" | "ids" | "positions" | "int" | "bool" | "float"
    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, ...]  # the example's shape; batch/seq dims are replaced per draw
    dims: Mapping[int, str]  # {0: "batch", 1: "seq"}
    low: float = 0.0  # ints: values in [low, high); floats: mean
    high: float = 1.0  # floats: std


@dataclasses.dataclass(frozen=True)
class _Space:
    inputs: tuple[_Input, ...]
    batch: tuple[int, int]
    seq: tuple[int, int] | None
    pad_id: int | None

    @property
    def mask_name(self) -> str | None:
        return next((i.name for i in self.inputs if i.kind == "mask" and i.dims.get(1) == "seq"), None)


def _pick(space: _Space, integer: Callable[[int, int], int], choose: Callable[[tuple], Any]) -> Draw:
    """One draw, its choices made by `integer(lo, hi)` (inclusive) and `choose(options)`: hypothesis'
    strategies in a test, a seeded Random where hypothesis cannot draw (an outer @example)."""
    batch = integer(*space.batch)
    seq = integer(*space.seq) if space.seq else None
    padding, pads = "none", (0,) * batch
    if space.mask_name and seq is not None and seq > 1:
        padding = choose(PADDINGS)
        if padding != "none":
            # The first row is always padded, so a drawn side is a real padding pattern;
            # every row keeps at least one real token.
            pads = (integer(1, seq - 1), *(integer(0, seq - 1) for _ in range(batch - 1)))
    return Draw(batch, seq, padding, pads, integer(0, _MAX_SEED), space.mask_name)


def _draws(space: _Space) -> st.SearchStrategy[Draw]:
    @st.composite
    def draw_one(draw) -> Draw:
        return _pick(space, lambda lo, hi: draw(st.integers(lo, hi)), lambda xs: draw(st.sampled_from(xs)))

    return draw_one()


def _fixed_draws(space: _Space, n: int) -> list[Draw]:
    """n draws without hypothesis: the simplest input (what shrinking ends at), then seeded ones."""
    rng = random.Random(0)
    return [_pick(space, lambda lo, hi: lo, lambda xs: xs[0])] + [
        _pick(space, rng.randint, rng.choice) for _ in range(n - 1)]


def _mask(d: Draw) -> torch.Tensor | None:
    if d.seq is None:
        return None
    mask = torch.ones(d.batch, d.seq, dtype=torch.long)
    for row, p in enumerate(d.pads):
        if p and d.padding == "left":
            mask[row, :p] = 0
        elif p and d.padding == "right":
            mask[row, d.seq - p:] = 0
    return mask


def _build(space: _Space, d: Draw) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(d.seed)
    mask = _mask(d)
    out: dict[str, torch.Tensor] = {}
    for spec in space.inputs:
        shape = list(spec.shape)
        for dim, role in spec.dims.items():
            shape[dim] = d.batch if role == "batch" else (d.seq if role == "seq" and d.seq else shape[dim])
        token_shaped = mask is not None and len(shape) == 2 and spec.dims.get(1) == "seq"
        if spec.kind == "mask":
            value = mask if token_shaped else torch.ones(shape, dtype=torch.long)
        elif spec.kind == "positions" and token_shaped:
            value = torch.arange(d.seq).expand(d.batch, d.seq).clone()
        elif spec.kind in ("ids", "labels", "int", "positions"):
            value = torch.randint(int(spec.low), int(spec.high), shape, generator=gen)
            if spec.kind == "labels" and token_shaped:
                value[mask == 0] = IGNORE_INDEX  # a padded position has no label: the loss skips it
            elif spec.kind == "ids" and token_shaped and space.pad_id is not None:
                value[mask == 0] = space.pad_id
        elif spec.kind == "bool":
            value = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            value = torch.randn(shape, generator=gen, dtype=torch.float64) * spec.high + spec.low
        out[spec.name] = value.to(dtype=spec.dtype, device=spec.device)
    return out


def _space(compiled, module: nn.Module, example: Mapping[str, torch.Tensor], max_batch: int,
           max_seq: int) -> _Space:
    config = getattr(module, "config", None)
    vocab = _vocab_size(module, config)
    bounds = _dim_bounds(compiled)
    inputs, batch, seq = [], [1, max_batch], None
    for info in compiled.graph.inputs:
        value = example[info.name]
        inputs.append(_describe_input(info, value, vocab, config))
        for dim, role in info.dims.items():
            lo, hi = bounds.get(str(info.shape[dim]), (1, None))
            if role == "batch":
                batch = [max(batch[0], lo), min(batch[1], hi) if hi else batch[1]]
            elif role == "seq":
                seq = seq or [1, max_seq]
                seq = [max(seq[0], lo), min(seq[1], hi) if hi else seq[1]]
    if seq is not None:
        limit = _max_positions(config)
        if limit:
            seq[1] = min(seq[1], limit)
    for name, rng in (("batch", batch), ("seq", seq)):
        if rng is not None and rng[0] > rng[1]:
            raise ValueError(f"check_policy: no {name} size to draw: the compiled model allows "
                             f"{name} >= {rng[0]}, the limit is {rng[1]} (raise max_{name})")
    pad = getattr(config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and (vocab is None or 0 <= pad < vocab) else None
    return _Space(tuple(inputs), tuple(batch), tuple(seq) if seq else None, pad)


def _dim_bounds(compiled) -> dict[str, tuple[int, int | None]]:
    """{symbol: (lowest, highest or None)} from the exported graph's range constraints.

    torch.export reports every dynamic dim as >= 2 (capture widens sizes 0/1 so export does not
    specialize them) and the captured graphs run sizes 1 exactly (tests/passes/test_capture.py),
    so a lower bound of 2 means 1; a higher one is a real constraint."""
    out = {}
    for sym, rng in (getattr(compiled.program, "range_constraints", None) or {}).items():
        lo = int(rng.lower) if _finite(rng.lower) else 1
        hi = int(rng.upper) if _finite(rng.upper) else None
        out[str(sym)] = (1 if lo <= 2 else lo, hi)
    return out


def _finite(x) -> bool:
    """A sympy bound (an Integer, or int_oo / -int_oo) that is a plain integer."""
    import sympy  # torch's own dependency; only reached with a compiled graph in hand

    return isinstance(x, (int, sympy.Integer))


def _vocab_size(module: nn.Module, config) -> int | None:
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    get = getattr(module, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def _max_positions(config) -> int | None:
    for field in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _describe_input(info, value: torch.Tensor, vocab: int | None, config) -> _Input:
    name, dtype = info.name, value.dtype
    common = dict(name=name, dtype=dtype, device=value.device, shape=tuple(value.shape), dims=dict(info.dims))
    if dtype.is_floating_point or dtype.is_complex:
        if "mask" in name:
            return _Input(kind="mask", **common)
        std = float(value.double().std()) if value.numel() > 1 else 1.0
        return _Input(kind="float", low=float(value.double().mean()),
                      high=std if math.isfinite(std) and std > 0 else 1.0, **common)
    if dtype == torch.bool:
        return _Input(kind="mask" if "mask" in name else "bool", **common)
    if "mask" in name:
        return _Input(kind="mask", **common)
    if name == "position_ids":
        return _Input(kind="positions", low=0, high=max(int(value.max()) + 1, 1), **common)
    if name.endswith("input_ids") or name == "labels":
        high = vocab if vocab else int(value.max()) + 1
        return _Input(kind="labels" if name == "labels" else "ids", low=0, high=max(high, 1), **common)
    if name == "token_type_ids" and isinstance(getattr(config, "type_vocab_size", None), int):
        return _Input(kind="int", low=0, high=max(config.type_vocab_size, 1), **common)
    return _Input(kind="int", low=int(value.min()), high=int(value.max()) + 1, **common)


# ---- the check -----------------------------------------------------------------------------


def check_policy(model, policy, *, example_inputs: Mapping[str, Any] | None = None, calib=None,
                 rtol: float = 1e-2, atol: float = 1e-2,
                 metric: Callable[[Any, Any], bool | float] | None = None,
                 max_examples: int = 20, max_batch: int = 4, max_seq: int = 32,
                 name: str | None = None, seed: int | None = None) -> PolicyCheckResult:
    """Compile `model` with `policy` once, then compare it with the original on drawn inputs.

        from slimfx.models import tiny
        from slimfx.testing import check_policy

        def test_my_policy():
            # int8 weights: logits of the tiny llama (|logit| < 1) move by well under 0.02
            check_policy(tiny("llama"), "policy p {\\n quantize blocks.*.** : Linear int8\\n}\\n",
                         rtol=0, atol=0.02)

    `model`, `policy`, `example_inputs`, `calib` and `name` are what `slimfx.compile` takes (a
    `slimfx.models` LoadedModel carries its example inputs; a CompiledModel — compiled again, as
    compile() does — needs `example_inputs` here to draw inputs like them, since its graph keeps
    only their shapes). Hypothesis draws batch sizes (1 to `max_batch`), sequence lengths (1 to
    `max_seq`, within what the compiled graph and the original model take: a length the original
    refuses, past its position table, is never drawn) and padding — attention masks all ones, or with zeros at the left or the
    right end of rows — and builds every input the example inputs have, with their names and
    dtypes (token ids within the vocabulary, pad id at padded positions, `labels` -100 there, the
    index a loss skips; float inputs such as
    ViT pixel_values drawn with the example's mean and spread, only the dynamic dims changing).

    On each draw both models run (the original in eval mode, without gradients) and:
    - the outputs must have the same structure: type, keys, leaf shapes;
    - every element at a real token (padded positions of outputs shaped [batch, seq, …] in the
      compiled graph are skipped) must satisfy |compiled - original| <= atol + rtol * |original|
      (torch.allclose's rule: an inf or NaN matches only itself), or,
      with `metric`, `metric(original, compiled)` must return True or a float <= atol (padded
      positions are zeroed in both outputs first).
    The default tolerance (rtol = atol = 1e-2) suits outputs of order 1 under fp16/bf16/int8
    weights; int4/int2 policies need a bound chosen from their format (see the README).

    A failure raises PolicyCheckError (an AssertionError) naming the smallest failing input
    hypothesis shrank to (batch, seq, padding) and the error there, with that input's tensors
    (`.inputs`) and the seed that replays the run (`.seed`). On success it returns a
    PolicyCheckResult with the compiled model and every draw.

    In a plain test it runs a hypothesis test of its own (`max_examples` draws, no deadline, no
    database) from `seed`, or a fresh random seed that a failure reports (a derandomized
    hypothesis profile fixes the draws instead). Inside an outer @given it does not nest one
    (hypothesis refuses nested @given): it draws up to `max_examples` inputs from the outer test's
    data, so the outer test shrinks them with its own arguments (each outer example compiles
    again: keep both example counts small there, and give the outer test `deadline=None`); in an
    outer @example, which has no data to draw from, it runs the simplest input and seeded ones.
    """
    from . import api

    _check_arguments(max_examples, max_batch, max_seq, rtol, atol, seed)
    from .runtime.compiled import CompiledModel

    module, example = api.unwrap(model, example_inputs)
    if example is None:  # before the compile, not after it
        raise TypeError("check_policy needs example_inputs to draw inputs like them" + (
            ": a CompiledModel's graph keeps only their shapes (pass the inputs it was compiled with)"
            if isinstance(module, CompiledModel) else " (or a slimfx.models LoadedModel, which carries them)"))
    # A CompiledModel is compiled again from its own graph (compile() refuses inputs with it).
    compiled = api.compile(model, policy, example_inputs=None if isinstance(module, CompiledModel) else example_inputs,
                           calib=calib, name=name)
    tensors, consts = _split_example(module, example, compiled.input_names)
    space = _within_the_model(_space(compiled, module, tensors, max_batch, max_seq), module, consts)
    token_leaves = _token_leaves(compiled.graph)
    results: list[DrawResult] = []

    def run_one(d: Draw) -> None:
        failure = _check_draw(module, compiled, space, consts, d, rtol, atol, metric, results, token_leaves)
        if failure is not None:
            raise _Failure(d, *failure)

    nested = currently_in_test_context()
    used_seed = None if nested else _own_seed(seed)
    try:
        if nested:
            _run_in_outer_test(space, run_one, max_examples)
        else:
            _run_own_test(space, run_one, max_examples, used_seed)
    except _Failure as f:
        raise PolicyCheckError(_message(compiled, f, len(results), rtol, atol, metric, used_seed), f.draw, f.value,
                               _build(space, f.draw), used_seed) from None
    return PolicyCheckResult(compiled, results)


def _check_arguments(max_examples, max_batch, max_seq, rtol, atol, seed) -> None:
    """Refused before the compile, not as hypothesis' InvalidArgument (or a NaN bound that passes
    everything) after it."""
    for label, n in (("max_examples", max_examples), ("max_batch", max_batch), ("max_seq", max_seq)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"check_policy: {label} must be a whole number of at least 1, got {n!r}")
    for label, x in (("rtol", rtol), ("atol", atol)):
        if not isinstance(x, numbers.Real) or isinstance(x, bool) or not math.isfinite(x) or x < 0:
            raise ValueError(f"check_policy: {label} must be a finite number >= 0, got {x!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"check_policy: seed must be a whole number >= 0 (or None), got {seed!r}")


def _own_seed(seed: int | None) -> int | None:
    """The seed check_policy's own test runs from: the user's, else a fresh one (reported on a
    failure, so that the run can be replayed), or None under a derandomized hypothesis profile."""
    if seed is None and not getattr(settings.default, "derandomize", False):
        seed = random.SystemRandom().randrange(2**32)
    return seed


def _run_own_test(space: _Space, run_one, max_examples: int, seed: int | None) -> None:
    """A hypothesis test of its own: draws, and on failure shrinks to the smallest failing draw."""
    test = given(_draws(space))(run_one)
    test = settings(
        max_examples=max_examples, deadline=None, database=None, print_blob=False,
        derandomize=seed is None, report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate, Phase.shrink),
    )(test)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    test()


def _run_in_outer_test(space: _Space, run_one, max_examples: int) -> None:
    """Inside an outer @given, a nested @given fails hypothesis' nested_given health check, and
    would shrink quadratically. Draw from the outer test's data instead (what st.data() does): the
    outer test then shrinks these draws together with its own, and its falsifying example lists
    them. Stops at the first failing draw.

    An outer @example runs on data with no choices at all (drawing from it stops the test with
    hypothesis' StopTest): there the draws are the simplest input and seeded ones."""
    data = current_build_context().data
    if getattr(data, "max_choices", None) == 0:
        for d in _fixed_draws(space, max_examples):
            run_one(d)
        return
    drawn = data.draw(st.data())
    strategy = _draws(space)
    for _ in range(max_examples):
        run_one(drawn.draw(strategy, label="check_policy input"))


def _within_the_model(space: _Space, module, consts) -> _Space:
    """The space with its longest sequence one the original model takes. A position table can be
    shorter than any config field says (RoBERTa's positions start after its padding index; a
    hand-written model has no config): the original runs the longest unpadded sequence, and on an
    error the longest it takes is searched for. The compiled model is not asked: a length it
    refuses where the original runs is what check_policy reports."""
    if space.seq is None:
        return space
    lo, hi = space.seq

    def runs(n: int) -> Exception | None:
        d = Draw(1, n, "none", (0,), 0, space.mask_name)
        try:
            with torch.no_grad(), eval_mode(module):
                module(**_build(space, d), **consts)
        except Exception as e:  # noqa: BLE001 - said below when no length runs
            return e
        return None

    if runs(hi) is None:
        return space
    first = runs(lo)
    if first is not None:
        simplest = Draw(1, lo, "none", (0,), 0, space.mask_name)
        raise ValueError(f"check_policy: the original model raised {type(first).__name__}: {_first_line(first)} "
                         f"on the simplest input drawn like the example inputs ({simplest.describe()}): check "
                         "example_inputs, or call the model with them yourself to see why")
    while lo < hi - 1:  # runs(lo), not runs(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if runs(mid) is None else (lo, mid)
    return dataclasses.replace(space, seq=(space.seq[0], lo))


def _token_leaves(graph) -> tuple[bool, ...] | None:
    """Per output leaf: is it shaped [batch, seq, …] in the compiled graph's symbols (a per-token
    output, whose padded positions are not compared)? Shapes alone cannot say: [batch, classes]
    logits look per-token on a draw whose length equals the class count. None when a graph
    output has no recorded shape (the comparison then goes by shapes)."""
    batch = {str(i.shape[d]) for i in graph.inputs for d, role in i.dims.items() if role == "batch"}
    seq = {str(i.shape[d]) for i in graph.inputs for d, role in i.dims.items() if role == "seq"}
    out = next(n for n in reversed(graph.module.graph.nodes) if n.op == "output")
    tensors = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    constants = graph.outputs.constants
    if sum(c is None for c in constants) != len(tensors):
        return None
    flags, nodes = [], iter(tensors)
    for const in constants:
        if const is not None:
            flags.append(False)
            continue
        node = next(nodes)
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        shape = [str(s) for s in val.shape]
        flags.append(len(shape) >= 2 and shape[0] in batch and shape[1] in seq)
    return tuple(flags)


def _check_draw(module, compiled, space, consts, d, rtol, atol, metric, results, token_leaves):
    """None, or (detail, value) for a draw on which the compiled model fails."""
    inputs = _build(space, d)
    mask = _mask(d) if d.padding != "none" else None
    try:
        with torch.no_grad(), eval_mode(module):
            orig = module(**inputs, **consts)
    except Exception as e:  # noqa: BLE001 - reported with the input that caused it
        failure = (f"the original model raised {type(e).__name__}: {_first_line(e)} (check_policy drew an "
                   "input the model does not take: lower max_seq/max_batch or pass other example_inputs)",
                   math.inf)
        results.append(DrawResult(d, False, math.inf))
        return failure
    try:
        with torch.no_grad():
            comp = compiled(**inputs)
    except Exception as e:  # noqa: BLE001
        results.append(DrawResult(d, False, math.inf))
        return f"the compiled model raised {type(e).__name__}: {_first_line(e)}", math.inf
    problem = structure_problem(orig, comp)
    if problem is not None:
        results.append(DrawResult(d, False, math.inf))
        return problem, math.inf
    if metric is not None:
        try:
            problem, value = metric_result(metric, orig, comp, mask, atol, token_leaves)
        except MetricReturnError as e:  # it returned, and not a bool or a number: not "raised"
            raise TypeError(f"{e} on {d.describe()}; a metric takes (original, compiled) outputs and must return "
                            "True/False or a number (a float <= atol passes)") from None
        except Exception as e:  # the user's metric, not the policy: said as such, with the input
            raise TypeError(f"metric {callable_name(metric)} raised {type(e).__name__}: {_first_line(e)} on "
                            f"{d.describe()}; a metric takes (original, compiled) outputs and returns True/False "
                            "or a float") from e
    else:
        problem, value = tolerance_problem(orig, comp, mask, rtol, atol, token_leaves)
    results.append(DrawResult(d, problem is None, value))
    return None if problem is None else (problem, value)


def _message(compiled, f: _Failure, tried: int, rtol, atol, metric, seed: int | None) -> str:
    policy = f"policy `{compiled.policy_name}`" if compiled.policy_name else "the empty policy"
    rule = (f"metric {callable_name(metric)}(original, compiled) is True or <= {atol:g}" if metric is not None else
            f"|compiled - original| <= atol + rtol * |original|, rtol={rtol:g}, atol={atol:g}, real tokens only")
    numeric = f.detail.startswith("metric ") or "max |compiled - original|" in f.detail
    return (f"check_policy: compiled {compiled.graph.model_class} ({policy}) departs from the original model\n"
            f"  smallest failing input: {f.draw.describe()}\n"
            f"  {f.detail}\n"
            + (f"  required: {rule}\n" if numeric else "")
            + f"  ({tried} inputs run, shrinking included"
            + (f"; check_policy(..., seed={seed}) replays this run)" if seed is not None else ")"))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _split_example(module: nn.Module, example, names: tuple[str, ...]):
    """({name: example tensor} for the compiled model's inputs, non-tensor keyword constants for
    the original — the ones capture passed it, use_cache=False included)."""
    tensor_names, values, consts = bind_inputs(module, example)  # as capture bound them
    tensors = dict(zip(tensor_names, values))
    missing = [n for n in names if n not in tensors]
    if missing:
        raise TypeError(f"check_policy: the compiled model takes {list(names)} but the example inputs "
                        f"have no tensor for {missing}")
    return {n: tensors[n] for n in names}, consts
