"""Per-rule parameter schemas: names, types, ranges and defaults.

The grammar accepts any `name=value`; this table decides which names each rule takes and what
their values may be. The parser coerces values with it, the printer orders parameters by it,
and `slimfx.testing` draws valid values from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .ast import Value

__all__ = [
    "ParamSpec", "SCHEMAS", "FORMATS", "ADAPTER_DTYPES", "INT_FORMATS", "FORMAT_BITS", "HALF_DTYPES", "SIZE_UNITS",
    "METRICS", "HEAL_METHOD_PARAMS", "schema_key", "default_for", "is_power_of_two",
]

FORMATS = ("int8", "int4", "int2", "fp16", "bf16", "keep")
INT_FORMATS = ("int8", "int4", "int2")
FORMAT_BITS = {"int8": 8, "int4": 4, "int2": 2, "fp16": 16, "bf16": 16, "keep": 32}
# The float formats a weight is cast to, not quantized, by torch dtype name (no torch here).
HALF_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
# An integer format's group when a rule gives none (None: one per output channel); runtime/formats.py
# holds the same table (it may not import the compiler; a test ties the two).
DEFAULT_GROUP = {"int8": None, "int4": 64, "int2": 64}
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
METRICS = ("output_mse", "fisher")
ADAPTERS = ("lora", "dora")
ADAPTER_DTYPES = ("fp32", "fp16", "bf16")
TOKEN_ACTIONS = ("prune", "merge")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its type, default, and the range check with the phrase that explains it."""

    name: str
    type: type  # bool, int, float or str (an identifier or a quoted string)
    default: Value | None
    doc: str
    check: Callable[[Value], bool] = lambda v: True
    range_text: str = ""  # e.g. "a power of two, at least 16"
    choices: tuple[str, ...] = ()  # for identifiers
    example: str = ""  # a valid value for messages, where the default is None

    def valid(self, value: Value) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return self.check(value)

    @property
    def expectation(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return self.range_text or _TYPE_WORDS[self.type]


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a name or a quoted string"}


FLOAT32_MAX = 3.4028234663852886e38


def _fraction_open(v):  # (0, 1)
    return 0 < v < 1


def _fraction_half_open(v):  # (0, 1]
    return 0 < v <= 1


_GROUP = ParamSpec("group", int, None, "weights per quantization group along the input dim "
                   "(default: per output channel for int8, 64 for int4/int2)",
                   lambda v: is_power_of_two(v) and v >= 16, "a power of two, at least 16", example="64")
_SYM = ParamSpec("sym", bool, True, "symmetric (true) or with a zero point (false)")
_ZERO = ParamSpec("zero", str, "int", "with sym=false: a whole zero point per group, packed in the format's bits "
                  "(`int`), or a float offset per group, fp16, over the group's own range (`float`, as "
                  "llama.cpp's Q4_1)", choices=("int", "float"))
_METHOD_Q = ParamSpec("method", str, "rtn", "round-to-nearest or GPTQ", choices=("rtn", "gptq"))
_DAMP = ParamSpec("damp", float, 0.01, "GPTQ damping, as a fraction of the mean Hessian diagonal",
                  _fraction_half_open, "a number in (0, 1]")
_ACT_ORDER = ParamSpec("act_order", bool, False, "GPTQ: quantize columns in order of Hessian diagonal")
_SEQUENTIAL = ParamSpec("sequential", bool, True, "GPTQ block by block, each block calibrated on the outputs "
                        "of the blocks before it as already compressed")
_TRUE_SEQUENTIAL = ParamSpec("true_sequential", bool, False, "GPTQ inside each block too: q/k/v, then o, then "
                             "gate/up, then down, each calibrated on the sublayers before it as already "
                             "compressed")
_CLIP = ParamSpec("clip", str, "none", "search each group's range for the least rounding error: plain weight "
                  "MSE (`mse`) or weighted by each input's calibration energy (`output`)",
                  choices=("none", "mse", "output"))
_REFIT = ParamSpec("refit", bool, False, "GPTQ: once the codes are chosen, solve for each group's scale (and "
                   "float offset) that fits them best in the calibration-weighted error, alternating with GPTQ on "
                   "the fitted grid")
_PROTECT = ParamSpec("protect", str, "none", "tokens never pruned or merged", choices=("cls", "none"))
_RESTORE = ParamSpec("restore", bool, False, "scatter tokens back so the output keeps its length")


def _specs(*specs: ParamSpec) -> dict[str, ParamSpec]:
    return {s.name: s for s in specs}


# `auto(ratio=…)` or `auto(count=…)`, never both; a consumer reads `count` first, then `ratio`.
def _ratio(verb: str) -> ParamSpec:
    return ParamSpec("ratio", float, 0.25, f"fraction of blocks to {verb} (when `count` is not given)",
                     _fraction_open, "a number in (0, 1)")


def _count(verb: str) -> ParamSpec:
    return ParamSpec("count", int, None, f"number of blocks to {verb}", lambda v: v >= 1, "an integer ≥ 1",
                     example="4")


# Key: rule keyword, or "<keyword>.<variant>" where the variant changes what is accepted.
SCHEMAS: dict[str, dict[str, ParamSpec]] = {
    "collapse": _specs(
        ParamSpec("method", str, "laco", "how blocks are merged (LaCo: θ_l + Σ(θ_k − θ_l))", choices=("laco",)),
    ),
    "collapse.auto": _specs(
        _ratio("remove"),
        _count("remove"),
        ParamSpec("threshold", float, 0.9, "accept a merge while calibration outputs keep this cosine similarity",
                  _fraction_half_open, "a number in (0, 1]"),
        ParamSpec("span", int, 4, "blocks merged in one step (LaCo's C)", lambda v: v >= 2, "an integer ≥ 2"),
        ParamSpec("interval", int, 1, "blocks kept between merges (LaCo's I)", lambda v: v >= 1, "an integer ≥ 1"),
    ),
    "drop": _specs(),
    "drop.auto": _specs(
        _ratio("drop"),
        _count("drop"),
        ParamSpec("score", str, "influence", "how blocks are ranked: `influence` is block influence "
                  "1 − cos(x_in, x_out) of each block alone; `angular` is the angular distance between a "
                  "run's residual input and output (Gromov et al. 2024)", choices=("influence", "angular")),
        ParamSpec("max_run", int, 4, "longest contiguous run removed at once (score=angular)",
                  lambda v: v >= 1, "an integer ≥ 1"),
    ),
    "adapt": _specs(
        ParamSpec("rank", int, 8, "adapter rank r", lambda v: v >= 1, "an integer ≥ 1"),
        # at most float32's largest: the scale α/r is a float32 factor, and an infinite one times
        # B's starting zeros made every output NaN (alpha=1e308 compiled without a word)
        ParamSpec("alpha", float, 16.0, "scale α (the update is α/r · B·A)", lambda v: 0 < v <= FLOAT32_MAX,
                  "a number > 0 and at most 3.4e38 (float32's largest)"),
        ParamSpec("dropout", float, 0.0, "dropout on the adapter input", lambda v: 0 <= v < 1, "a number in [0, 1)"),
        ParamSpec("init", str, "kaiming", "initialisation: A kaiming-uniform or gaussian with B zero (the outputs "
                  "start unchanged), or `error`: B·A from the calibration-weighted SVD of the quantization error "
                  "of a `quantize` before it (EoRA), so the adapter starts by undoing most of that error",
                  choices=("kaiming", "gaussian", "error")),
        ParamSpec("dtype", str, "fp32", "the dtype A and B are stored in (cast up to the activations' dtype "
                  "where they are read; DoRA's magnitude stays fp32)", choices=ADAPTER_DTYPES),
        ParamSpec("merge", bool, False, "fold the adapter into the base weight"),
        ParamSpec("from", str, None, "a PEFT adapter directory to load (its rank, alpha and method apply)",
                  lambda v: isinstance(v, str) and v.strip() != "", "a directory path in quotes",
                  example='"adapters/my-lora"'),
    ),
    "quantize": _specs(_GROUP, _SYM, _ZERO, _METHOD_Q, _DAMP, _ACT_ORDER, _CLIP, _REFIT, _SEQUENTIAL,
                       _TRUE_SEQUENTIAL),
    "choice": _specs(_GROUP, _SYM, _ZERO),
    "precision": _specs(_METHOD_Q, _DAMP, _ACT_ORDER, _CLIP, _REFIT, _SEQUENTIAL, _TRUE_SEQUENTIAL),
    "tokens.prune": _specs(
        ParamSpec("keep", float, 0.5, "fraction of tokens kept", _fraction_half_open, "a number in (0, 1]"),
        ParamSpec("score", str, "attention", "how tokens are ranked", choices=("attention", "norm")),
        _PROTECT, _RESTORE,
    ),
    "tokens.merge": _specs(
        # Bipartite matching merges at most half the tokens in one step (each A token into a B token).
        ParamSpec("ratio", float, 0.25, "fraction of each sequence's tokens merged away in one step (ToMe)",
                  lambda v: 0 < v <= 0.5, "a number in (0, 0.5]"),
        ParamSpec("by", str, "hidden", "what token similarity is measured on: the hidden states, or the keys "
                  "of the block's own attention, averaged over heads (ToMe)", choices=("hidden", "keys")),
        ParamSpec("prop_attn", bool, False, "proportional attention: later attention counts a merged token as "
                  "the tokens it holds (ToMe)"),
        _PROTECT, _RESTORE,
    ),
    "tokens.unpad": _specs(),  # `tokens unpad` alone: nothing to tune
    "keep": _specs(),
    # One table for both methods; HEAL_METHOD_PARAMS says which method takes which parameter.
    "heal": _specs(
        ParamSpec("method", str, None, "`linear` fits a linear map where blocks were removed (training-free, "
                  "seconds); `lora` trains low-rank adapters",
                  choices=("linear", "lora"), example="linear"),
        ParamSpec("fold", bool, False, "fold the linear map into the previous block's down projection (no new op)"),
        ParamSpec("steps", int, 100, "training steps", lambda v: v >= 1, "an integer ≥ 1"),
        ParamSpec("lr", float, 1e-4, "learning rate", lambda v: v > 0, "a number > 0"),
        ParamSpec("schedule", str, "constant", "learning-rate schedule: `constant`, or `cosine` (warm-up over "
                  "the first 5% of the steps, then decay towards 0)", choices=("constant", "cosine")),
        ParamSpec("rank", int, 8, "rank of the healing adapters", lambda v: v >= 1, "an integer ≥ 1"),
        ParamSpec("reach", int, 1, "adapters on every linear of the blocks up to this many blocks from a cut, "
                  "on each side (1: the block just before and the block just after each cut)",
                  lambda v: v >= 1, "an integer ≥ 1"),
        ParamSpec("distill", bool, False, "loss against the uncompressed model's logits"),
        ParamSpec("merge", bool, True, "merge the healing adapters into the weights afterwards"),
        ParamSpec("generate", int, 0, "also train on at least this many tokens of text the uncompressed model "
                  "writes after openings of the calibration text, after the calibration batches (0: the "
                  "calibration text only)",
                  lambda v: v >= 0, "an integer ≥ 0"),
    ),
}

# `heal` parameters that only one method takes (`method` itself goes with both).
HEAL_METHOD_PARAMS = {"fold": "linear", "steps": "lora", "lr": "lora", "schedule": "lora", "rank": "lora",
                      "reach": "lora", "distill": "lora", "merge": "lora", "generate": "lora"}

# Parameters that only make sense for integer formats (a float format takes none).
INT_ONLY_PARAMS = ("group", "sym", "zero", "method", "damp", "act_order", "clip", "refit", "sequential",
                   "true_sequential")


def schema_key(node) -> str:
    """The SCHEMAS key for an AST node (a rule, an Auto of a rule, or a FormatChoice)."""
    kind = node.kind
    if kind == "tokens":
        return f"tokens.{node.action}"
    if kind == "auto":
        return f"{node.of}.auto"
    return kind


def default_for(node, name: str) -> Value | None:
    spec = SCHEMAS[schema_key(node)].get(name)
    if spec is None:
        raise KeyError(f"`{node.kind}` takes no parameter `{name}`")
    return spec.default
