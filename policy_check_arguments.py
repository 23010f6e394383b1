"""check_policy's arguments, refused before the compile: counts, tolerances, the seed, the
metric's signature, padding that cannot be drawn, a deadline inside an outer @given. A bad one
became hypothesis' InvalidArgument (or a NaN bound that passed everything, a metric that could not
be called) after minutes of compiling."""
from __future__ import annotations

import inspect
import math
import numbers

from hypothesis import settings

from .policy_compare import callable_name
from .policy_inputs import Space

__all__ = ["DEFAULT_RTOL", "MAX_BATCH", "check_arguments", "check_padding_drawable", "check_no_deadline", "whole"]

DEFAULT_RTOL = 1e-2  # with atol's 1e-2: outputs of order 1 under fp16/bf16/int8 weights
MAX_BATCH = 1024


def check_arguments(max_examples, max_batch, max_seq, rtol, atol, seed, metric) -> tuple:
    """Refused before the compile, not as hypothesis' InvalidArgument (or a NaN bound that passes
    everything, or a metric that cannot be called) after it. Returns the counts and seed as ints
    (numpy's integers are whole numbers too)."""
    if metric is not None and not callable(metric):
        raise TypeError(f"check_policy: metric must be a function of (original, compiled) outputs returning "
                        f"True/False or a number, got the {type(metric).__name__} {metric!r} (None compares "
                        "element by element within rtol/atol)")
    if metric is not None:
        _check_takes_two(metric)
    counts = []
    for label, n in (("max_examples", max_examples), ("max_batch", max_batch), ("max_seq", max_seq)):
        if n is None and label == "max_seq":  # chosen from the model (default_max_seq)
            counts.append(None)
            continue
        if not whole(n) or n < 1:
            raise ValueError(f"check_policy: {label} must be a whole number of at least 1, got {n!r}")
        if label == "max_batch" and n > MAX_BATCH:  # 10**9 tried to allocate it, then hypothesis called it flaky
            raise ValueError(f"check_policy: max_batch is at most {MAX_BATCH} (a draw's batch is built whole, and a "
                             f"failure shrinks to the smallest batch that fails anyway), got {n!r}")
        counts.append(int(n))
    if metric is not None and rtol is not None:  # ignored before: only atol bounds a metric's float
        raise ValueError(f"check_policy: rtol={rtol!r} has no meaning with a metric (a float it returns passes when "
                         "<= atol): drop rtol, or scale inside the metric")
    rtol = DEFAULT_RTOL if rtol is None else rtol
    for label, x in (("rtol", rtol), ("atol", atol)):
        if not isinstance(x, numbers.Real) or isinstance(x, bool) or not math.isfinite(x) or x < 0:
            raise ValueError(f"check_policy: {label} must be a finite number >= 0, got {x!r}")
    if seed is not None and (not whole(seed) or seed < 0):
        raise ValueError(f"check_policy: seed must be a whole number >= 0 (or None), got {seed!r}")
    return (*counts, None if seed is None else int(seed), rtol)


def whole(n) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def _check_takes_two(metric) -> None:
    """A metric called with (original, compiled) outputs: one that cannot take two arguments
    failed only after the compile, as "metric raised TypeError"."""
    try:
        signature = inspect.signature(metric)
    except (TypeError, ValueError):  # a builtin without a signature: called as it is
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(f"check_policy: metric {callable_name(metric)}{signature} cannot be called with the "
                        "(original, compiled) outputs: it must take two arguments") from None


def check_padding_length(padding: str, max_seq: int) -> None:
    """What check_padding_drawable can tell before the compile: no sequence of two tokens to pad."""
    if padding in ("left", "right") and max_seq < 2:
        raise ValueError(f"check_policy: padding={padding!r} asks for padded inputs, and no input of two or more "
                         f"tokens can be drawn (max_seq={max_seq}: raise it); or pass padding='none'")


def check_padding_drawable(space: Space, padding: str) -> None:
    """`padding="left"`/`"right"` asked for padded inputs: refused where none can be drawn (the
    model takes no attention mask, or no sequence of two tokens), rather than passing on unpadded
    ones alone. The default ("both") pads where it can."""
    if padding not in ("left", "right") or (space.mask_name and space.seq and space.seq[1] > 1):
        return
    why = ("the compiled model takes no attention mask (its example inputs hold none: add an `attention_mask` to "
           "them)" if not space.mask_name else "no input of two or more tokens can be drawn (raise max_seq)")
    raise ValueError(f"check_policy: padding={padding!r} asks for padded inputs, and {why}; or pass padding='none'")


def check_no_deadline() -> None:
    """Inside an outer @given the first example compiles (seconds to minutes) and later ones reuse
    it: any deadline fails the first, then hypothesis calls the timings unreliable, or shrinks
    against it."""
    deadline = settings.default.deadline  # the running test's settings
    if deadline is not None:
        raise ValueError(f"check_policy inside a @given test needs the test's deadline off (it is {deadline}): "
                         "its first example compiles the model; add @settings(deadline=None) to the test")
