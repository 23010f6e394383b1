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
import hashlib
import math
import os
import random
import warnings
from typing import Any, Callable, Mapping

import torch
from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings, strategies as st
from hypothesis import core as hypothesis_core
from hypothesis.control import current_build_context, currently_in_test_context
from hypothesis.errors import Flaky
from torch import nn

from .passes.capture import bind_inputs
from .passes.capture_cache import state_key
from .passes.eval_mode import eval_mode
from .policy_check_arguments import (check_arguments, check_no_deadline, check_padding_drawable, check_padding_length,
                                     whole)
from .policy_compare import (MetricReturnError, callable_name, left_padding_hint, metric_result, structure_problem,
                             token_leaves, tolerance_problem)
from .policy_inputs import (PADDING_CHOICES, Draw, Space, build_inputs, default_max_seq, draw_mask, draws, first_line,
                            fixed_draws, input_space, within_the_model)

__all__ = ["check_policy", "PolicyCheckError", "PolicyCheckResult", "Draw", "DrawResult"]


# ---- what a check returns ------------------------------------------------------------------


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


# ---- the check -----------------------------------------------------------------------------


def check_policy(model, policy, *, example_inputs: Mapping[str, Any] | None = None, calib=None,
                 rtol: float | None = None, atol: float = 1e-2,
                 metric: Callable[[Any, Any], bool | float] | None = None,
                 max_examples: int = 20, max_batch: int = 4, max_seq: int | None = None, padding: str = "both",
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
    only their shapes). Hypothesis draws batch sizes (1 to `max_batch`, at most 1,024), sequence lengths (1 to
    `max_seq`, within what the compiled graph and the original model take: a length the original
    refuses, past its position table, is never drawn; by default 32, or 8 past the model's sliding
    window where that is at most 248 tokens — a longer window is warned about, since 32 never
    reaches it) and padding — attention masks all ones (a `key_padding_mask`, PyTorch's True =
    padding, all False), or with zeros at the left or the right end of rows (`padding="right"` or
    `"left"` draws only that side, as your tokenizer pads; `"none"` no padding) — and builds every
    input the example inputs have, with their names and dtypes (token ids within the vocabulary,
    pad id at padded positions, `labels` -100 there, the index a loss skips; float inputs such as
    ViT pixel_values drawn with the example's mean and spread, only the dynamic dims changing).

    On each draw both models run (the original in eval mode, without gradients) and:
    - the outputs must have the same structure: type, keys, leaf shapes;
    - every element at a real token (padded positions of outputs shaped [batch, seq, …] in the
      compiled graph are skipped) must satisfy |compiled - original| <= atol + rtol * |original|
      (torch.allclose's rule: an inf or NaN matches only itself), or,
      with `metric`, `metric(original, compiled)` must return True or a float <= atol (padded
      positions are zeroed in both outputs first; rtol is refused with a metric).
    The default tolerance (rtol = atol = 1e-2) suits outputs of order 1 under fp16/bf16/int8
    weights; int4/int2 policies need a bound chosen from their format (see the README).

    A failure raises PolicyCheckError (an AssertionError) naming the smallest failing input
    hypothesis shrank to (batch, seq, padding) and the error there, with that input's tensors
    (`.inputs`) and the seed that replays the run (`.seed`). On success it returns a
    PolicyCheckResult with the compiled model and every draw.

    In a plain test it runs a hypothesis test of its own (`max_examples` draws, no deadline, no
    database) from `seed`, else pytest's `--hypothesis-seed` (even under a derandomized profile),
    else a fresh random seed that a failure reports (a derandomized hypothesis profile fixes the
    draws instead). Inside an outer
    @given it does not nest one (hypothesis refuses nested @given): it draws up to `max_examples`
    inputs from the outer test's data, so the outer test shrinks them with its own arguments. The
    outer test must have `deadline=None` (refused otherwise), and the compiled model is reused
    while the same model object, unchanged, comes back with the same policy, inputs and options (the last such compile
    is held until the next nested call); in an outer @example, which has no data to draw from, it
    runs the simplest input and seeded ones.
    """
    from . import api

    max_examples, max_batch, max_seq, seed, rtol = check_arguments(max_examples, max_batch, max_seq, rtol, atol,
                                                                     seed, metric)
    if not isinstance(padding, str) or padding not in PADDING_CHOICES:  # a list raised "unhashable type"
        raise ValueError(f"check_policy: padding must be one of {', '.join(map(repr, PADDING_CHOICES))}, got {padding!r}")
    from .runtime.compiled import CompiledModel

    module, example = api.unwrap(model, example_inputs)
    api.check_model(module)  # a name or path: told to load it, not that it lacks example inputs
    if max_seq is None:
        max_seq, unreached = default_max_seq(module)
        if unreached:
            warnings.warn(unreached, stacklevel=2)
    if example is None:  # before the compile, not after it
        raise TypeError("check_policy needs example_inputs to draw inputs like them" + (
            ": a CompiledModel's graph keeps only their shapes (pass the inputs it was compiled with)"
            if isinstance(module, CompiledModel) else " (or a slimfx.models LoadedModel, which carries them)"))
    check_padding_length(padding, max_seq)  # before minutes of compiling; the rest once the graph says
    nested = currently_in_test_context()
    if nested:
        check_no_deadline()
        if seed is not None:  # the draws come from the outer test's data, whatever the seed
            warnings.warn("check_policy(seed=…) has no effect inside a hypothesis test: its inputs are drawn from "
                          "the outer test's data; seed that test (@hypothesis.seed(…)) to repeat them", stacklevel=2)
    # A CompiledModel is compiled again from its own graph (compile() refuses inputs with it).
    compile_args = (model, policy, None if isinstance(module, CompiledModel) else example_inputs, calib, name)
    compiled = _compile_once_per_outer_test(module, *compile_args) if nested else _compile(*compile_args)
    tensors, consts = _split_example(module, example, compiled.input_names)
    space = within_the_model(input_space(compiled, module, tensors, max_batch, max_seq), module, consts)
    space = dataclasses.replace(space, paddings=PADDING_CHOICES[padding])
    check_padding_drawable(space, padding)
    per_token = token_leaves(compiled.graph)
    results: list[DrawResult] = []

    def run_one(d: Draw) -> None:
        failure = _check_draw(module, compiled, space, consts, d, rtol, atol, metric, results, per_token)
        if failure is not None:
            raise _Failure(d, *failure)

    used_seed = None if nested else _own_seed(seed)
    try:
        if nested:
            _run_in_outer_test(space, run_one, max_examples)
        else:
            _run_own_test(space, run_one, max_examples, used_seed)
    except (_Failure, Flaky) as e:  # hypothesis' own FlakyFailure (an ExceptionGroup) named none of this
        f = _first_failure(e)
        if f is None:
            raise
        did_not_repeat = "" if f is e else (
            "\n  the same input then passed: the compiled model (or the original) does not compute the same on "
            "every call (nondeterministic kernels? dropout left on?)")
        raise PolicyCheckError(_message(compiled, f, len(results), rtol, atol, metric, used_seed, nested)
                               + did_not_repeat, f.draw, f.value, build_inputs(space, f.draw), used_seed) from None
    return PolicyCheckResult(compiled, results)


def _first_failure(e: BaseException) -> _Failure | None:
    """The draw's failure inside hypothesis' report that it did not repeat."""
    if isinstance(e, _Failure):
        return e
    for inner in (*getattr(e, "exceptions", ()), e.__cause__, e.__context__):
        found = _first_failure(inner) if inner is not None and inner is not e else None
        if found is not None:
            return found
    return None


def _compile(model, policy, example_inputs, calib, name):
    from . import api

    return api.compile(model, policy, example_inputs=example_inputs, calib=calib, name=name)


# The last compile inside an outer @given: (its key, the objects the key names by identity, the
# compiled model). Hypothesis calls the outer test again for every example and every shrink
# step (a hundred calls to shrink one failure); the same model, unchanged, with the same policy,
# inputs and options is compiled once. One entry: a test that draws the model compiles each.
_last_nested_compile: list = []


def _compile_once_per_outer_test(module, model, policy, example_inputs, calib, name):
    key = _compile_key(module, policy, name)
    held = (model, example_inputs, calib)
    if key is not None and _last_nested_compile:
        last_key, last_held, compiled = _last_nested_compile
        if last_key == key and all(a is b for a, b in zip(last_held, held)):
            return compiled
    compiled = _compile(model, policy, example_inputs, calib, name)
    _last_nested_compile[:] = [] if key is None else [key, held, compiled]
    return compiled


def _compile_key(module, policy, name):
    """What decides a compile besides the objects held by identity: the policy (a file's text as
    it is now), the name, and the model's state as capture's cache keys it (each tensor's identity,
    version and storage, the modules, attributes, hooks and config: `weight.data = …` or a new
    submodule per example kept the version numbers and reused the compile of the old weights);
    None where the policy is neither text nor a path (compiled every time)."""
    if isinstance(policy, os.PathLike) or isinstance(policy, str):
        try:
            stat = os.stat(policy)
            policy_key = (os.fspath(policy), stat.st_mtime_ns, stat.st_size)
        except (OSError, ValueError):  # text, not a file name
            policy_key = policy if isinstance(policy, str) else None
    else:
        policy_key = None
    if policy_key is None:
        return None
    return policy_key, name, state_key(module)


def _own_seed(seed: int | None) -> int | None:
    """The seed check_policy's own test runs from: the user's, else pytest's --hypothesis-seed
    (which hypothesis applies only to @given tests), else a fresh one (reported on a failure, so
    that the run can be replayed), or None under a derandomized hypothesis profile."""
    if seed is not None:
        return seed
    forced = hypothesis_core.global_force_seed
    if forced is not None:  # an int, or any other text given on the command line
        return forced if whole(forced) and 0 <= forced < 2**32 else _seed_of_text(str(forced))
    if not getattr(settings.default, "derandomize", False):
        return random.SystemRandom().randrange(2**32)
    return None


def _seed_of_text(text: str) -> int:
    """A whole-number seed for --hypothesis-seed=<text>, the same on every run (check_policy's
    `seed=` takes whole numbers)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def _run_own_test(space: Space, run_one, max_examples: int, seed: int | None) -> None:
    """A hypothesis test of its own: draws, and on failure shrinks to the smallest failing draw."""
    test = given(draws(space))(run_one)
    test = settings(
        max_examples=max_examples, deadline=None, database=None, print_blob=False,
        derandomize=seed is None, report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate, Phase.shrink),
    )(test)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    test()


def _run_in_outer_test(space: Space, run_one, max_examples: int) -> None:
    """Inside an outer @given, a nested @given fails hypothesis' nested_given health check, and
    would shrink quadratically. Draw from the outer test's data instead (what st.data() does): the
    outer test then shrinks these draws together with its own, and its falsifying example lists
    them. Stops at the first failing draw.

    An outer @example runs on data with no choices at all (drawing from it stops the test with
    hypothesis' StopTest): there the draws are the simplest input and seeded ones."""
    data = current_build_context().data
    if getattr(data, "max_choices", None) == 0:
        for d in fixed_draws(space, max_examples):
            run_one(d)
        return
    drawn = data.draw(st.data())
    strategy = draws(space)
    for _ in range(max_examples):
        run_one(drawn.draw(strategy, label="check_policy input"))


def _check_draw(module, compiled, space, consts, d, rtol, atol, metric, results, per_token):
    """None, or (detail, value) for a draw on which the compiled model fails."""
    inputs = build_inputs(space, d)
    mask = draw_mask(d) if d.padding != "none" else None
    try:
        with torch.no_grad(), eval_mode(module):
            orig = module(**inputs, **consts)
    except Exception as e:  # noqa: BLE001 - reported with the input that caused it
        failure = (f"the original model raised {type(e).__name__}: {first_line(e)} (check_policy drew an "
                   "input the model does not take: lower max_seq/max_batch or pass other example_inputs)",
                   math.inf)
        results.append(DrawResult(d, False, math.inf))
        return failure
    try:
        with torch.no_grad():
            comp = compiled(**inputs, **consts)  # the flags it was captured with, as the original gets them
    except Exception as e:  # noqa: BLE001
        results.append(DrawResult(d, False, math.inf))
        return f"the compiled model raised {type(e).__name__}: {first_line(e)}", math.inf
    problem = structure_problem(orig, comp, shapes=metric is None)  # a metric decides on sizes
    if problem is not None:
        results.append(DrawResult(d, False, math.inf))
        return problem, math.inf
    if metric is not None:
        try:
            problem, value = metric_result(metric, orig, comp, mask, atol, per_token)
        except MetricReturnError as e:  # it returned, and not a bool or a number: not "raised"
            raise TypeError(f"{e} on {d.describe()}; a metric takes (original, compiled) outputs and must return "
                            "True/False or a number (a float <= atol passes)") from None
        except Exception as e:  # the user's metric, not the policy: said as such, with the input
            shaped = structure_problem(orig, comp)
            if shaped is not None:  # unless the outputs' sizes differ too: then the compiled model is the cause
                results.append(DrawResult(d, False, math.inf))
                return (f"{shaped}\n    (metric {callable_name(metric)} raised {type(e).__name__} on them: "
                        f"{first_line(e)})"), math.inf
            raise TypeError(f"metric {callable_name(metric)} raised {type(e).__name__}: {first_line(e)} on "
                            f"{d.describe()}; a metric takes (original, compiled) outputs and returns True/False "
                            "or a float") from e
    else:
        problem, value = tolerance_problem(orig, comp, mask, rtol, atol, per_token)
        if problem is not None and d.padding == "left":
            problem += left_padding_hint(orig, per_token, problem)
    results.append(DrawResult(d, problem is None, value))
    return None if problem is None else (problem, value)


def _message(compiled, f: _Failure, tried: int, rtol, atol, metric, seed: int | None, nested: bool = False) -> str:
    policy = f"policy `{compiled.policy_name}`" if compiled.policy_name else "the empty policy"
    rule = (f"metric {callable_name(metric)}(original, compiled) is True or <= {atol:g}" if metric is not None else
            f"|compiled - original| <= atol + rtol * |original|, rtol={rtol:g}, atol={atol:g}, real tokens only")
    numeric = f.detail.startswith("metric ") or "max |compiled - original|" in f.detail
    return (f"check_policy: compiled {compiled.graph.model_class} ({policy}) departs from the original model\n"
            f"  smallest failing input: {f.draw.describe()}\n"
            f"  {f.detail}\n"
            + (f"  required: {rule}\n" if numeric else "")
            # Inside an outer @given each outer example is a call of its own: count this call's inputs.
            + (f"  ({tried} inputs run in this call; the outer test shrinks them with its own arguments)" if nested else
               f"  ({tried} inputs run, shrinking included"
               + (f"; check_policy(..., seed={seed}) replays this run)" if seed is not None else ")")))


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
