"""`role_rules()`: rule sequences that bind on the models slimfx supports, for property tests of a
model (`policies()` draws language-level text whose selectors are random names, which a model
seldom has).

    from hypothesis import given, settings
    from slimfx.models import tiny
    from slimfx.testing import role_rules

    model = tiny("llama", layers=4)

    @settings(max_examples=20, deadline=None)
    @given(role_rules(blocks=4))
    def test_every_policy_compiles_to_a_working_model(rules):
        cm = slimfx.compile(model, rules)        # or a SpecError naming the rule it cannot apply
        ...

Selectors are written in the house's role names (`blocks[i]`, `attn.q`…`attn.o`, `mlp.*`, `head`),
which most supported architectures bind (GPT-2, GPT-NeoX and Phi-3 fuse q, k and v into one
`attn.qkv`: `fused_qkv=True`; DistilBERT has no `head`), each weight rule on another part of the model; parameters are drawn from the schema
(GPTQ's options, zero points, adapter kinds, dtypes and inits), kept cheap where they cost time
(a LoRA heal trains 1–3 steps, text generation is off). Rules come in the order the language
wants: removals, then heals, then weight rules, then token rules. A drawn rule may still not
apply to a given model — `attn.q` on GPT-2's fused `c_attn`, a token merge on a causal model,
a block index a removal before it took away, a `keep` of a linear a collapse removed, a LoRA heal
without `distill=true` or a budget `by fisher` on an encoder — and compile() then refuses it with a SpecError at
its line: the property to test is "a working model or a SpecError", never another exception.
"""
from __future__ import annotations

import numbers

from hypothesis import strategies as st

from .dsl.printer import format_value
from .dsl.schema import FORMAT_BITS, FORMATS, INT_FORMATS, METRICS, SCHEMAS

__all__ = ["role_rules"]

# Selectors by the part of the model they name: weight rules take distinct parts, so that two of
# them never claim one linear (a second precision or adapter for it is a duplicate the checker refuses).
SELECTORS = {
    "attn.qkv": ("blocks.*.attn.{q,v}", "blocks[0].attn.q", "blocks[1:].attn.k"),
    "attn.o": ("blocks.*.attn.o", "blocks[-1].attn.o"),
    "mlp": ("blocks.*.mlp.*", "blocks[-1].mlp.down", "blocks[1].mlp.*"),
    "head": ("head",),
}
FUSED_QKV = ("blocks.*.attn.qkv", "blocks[0].attn.qkv", "blocks[1:].attn.qkv")
# Parameters drawn for each rule kind: the rest stay at their defaults (`from=` needs a directory
# of adapter weights; `generate=`, `steps=` and `reach=` cost minutes at their far ends).
_QUANTIZE_PARAMS = ("group", "sym", "zero", "method", "damp", "act_order", "clip", "refit", "sequential",
                    "true_sequential")
_ADAPT_PARAMS = ("alpha", "dropout", "init", "dtype", "merge")
# A LoRA rank each part's linears can take on the tiny models (a rank above a linear's smaller
# dimension is refused): ViT's classifier has 3 outputs, a GQA key projection 32.
_RANKS = {"head": (1, 2), "other": (1, 2, 4, 8, 16)}


def role_rules(blocks: int = 4, *, max_rules: int = 4, tokens: bool = True,
               fused_qkv: bool = False) -> st.SearchStrategy[str]:
    """Rules (bare, one per line, as compile() takes them) for a model of `blocks` blocks (at
    least 3): a removal (and a heal), weight rules on parts of the model, token rules — at most
    `max_rules` in all, the removal and its heal counted, a quantize with the adapter on it as
    one; `tokens=False` leaves token rules out (a causal model refuses merge and prune), and
    `fused_qkv=True` names the attention's input projection `attn.qkv`, as GPT-2, GPT-NeoX and
    Phi-3 have it (their `attn.q` is refused)."""
    if isinstance(blocks, bool) or not isinstance(blocks, numbers.Integral) or blocks < 3:  # numpy ints too
        raise ValueError(f"role_rules needs a model of at least 3 blocks (one to remove, one to merge into, "
                         f"one to keep), got blocks={blocks!r}")
    if isinstance(max_rules, bool) or not isinstance(max_rules, numbers.Integral) or max_rules < 1:
        raise ValueError(f"max_rules must be a whole number of at least 1, got {max_rules!r}")
    return _rules(int(blocks), int(max_rules), tokens, fused_qkv)


@st.composite
def _rules(draw, blocks: int, max_rules: int, tokens: bool, fused_qkv: bool) -> str:
    rules: list[str] = []
    removed = 0
    if draw(st.booleans()):
        removal, removed = draw(_removal(blocks))
        rules.append(removal)
        if draw(st.booleans()):
            # fold=true folds the map into the block before the gap: none before blocks[0], and
            # an auto search may remove that one
            rules.append(draw(_heal(fold=not removal.endswith(("[0]", "[0:2]")) and "auto" not in removal)))
    room = max_rules - len(rules)
    selectors = {**SELECTORS, "attn.qkv": FUSED_QKV} if fused_qkv else SELECTORS
    # each part drawn with its rule: drawn apart, a shrink that dropped a part shifted every later
    # rule's draws, and failures kept rules they did not need
    with_rules = st.sampled_from(sorted(selectors)).flatmap(
        lambda part: st.tuples(st.just(part), st.sampled_from(selectors[part]).flatmap(_weight_rule)))
    rules += [rule for _, rule in draw(st.lists(with_rules, max_size=max(0, room), unique_by=lambda t: t[0]))]
    if tokens and len(rules) < max_rules and draw(st.booleans()):
        rules += draw(_token_rules(blocks - removed))
    return "\n".join(rules[:max_rules]) or "keep head"


@st.composite
def _removal(draw, blocks: int) -> tuple[str, int]:
    """A removal rule and how many blocks it takes away."""
    i = draw(st.integers(0, blocks - 3))
    return draw(st.sampled_from([
        (f"drop blocks[{i}]", 1),
        (f"drop blocks[{i}:{i + 2}]", 2),
        (f"collapse blocks[{i}:{i + 2}]", 1),
        ("drop blocks auto(count=1)", 1),
        ("drop blocks auto(count=1, score=angular, max_run=1)", 1),
        ("collapse blocks auto(count=1, span=2, threshold=0.01)", 1),
    ]))


@st.composite
def _heal(draw, fold: bool) -> str:
    if draw(st.booleans()):
        return "heal method=linear" + draw(st.sampled_from(["", " fold=true"] if fold else [""]))
    extra = draw(st.lists(st.sampled_from(["distill=true", "merge=false", "schedule=cosine", "rank=2"]),
                          unique=True, max_size=2))
    return " ".join([f"heal method=lora steps={draw(st.integers(1, 3))}", *extra])


def _params(draw, key: str, names: tuple[str, ...]) -> str:
    """Schema-valid parameters of `key`, some of `names`, combinations fixed as policies() fixes them."""
    from .testing import _compatible, param_values

    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
    values = _compatible(draw, key, {n: draw(param_values(SCHEMAS[key][n])) for n in chosen})
    return "".join(f" {n}={format_value(v)}" for n, v in values.items())


@st.composite
def _weight_rule(draw, sel: str) -> str:
    kind = draw(st.sampled_from(["quantize", "quantize", "adapt", "qlora", "precision", "keep"]))
    if kind == "keep":
        return f"keep {sel}"
    if kind == "adapt":  # `init=error` needs a quantize of the same linears above it: "qlora"
        params = _params(draw, "adapt", _ADAPT_PARAMS).replace("init=error", "init=gaussian")
        rank = draw(st.sampled_from(_RANKS["head" if sel == "head" else "other"]))
        return f"adapt {sel} {draw(st.sampled_from(['lora', 'dora']))} rank={rank}" + params
    if kind in ("quantize", "qlora"):
        fmt = draw(st.sampled_from(INT_FORMATS if kind == "qlora" else FORMATS))
        rule = f"quantize {sel} {fmt}" + (_params(draw, "quantize", _QUANTIZE_PARAMS) if fmt in INT_FORMATS else "")
        if kind == "qlora":  # an adapter on the quantized linears, started from their error or not
            rule += f"\nadapt {sel} lora rank={draw(st.sampled_from([1, 2] if sel == 'head' else [2, 4]))}" + draw(
                st.sampled_from(["", " init=error", " dtype=bf16"]))
        return rule
    formats = draw(st.lists(st.sampled_from(FORMATS), min_size=2, max_size=3, unique=True))
    choices = ", ".join(f + (_params(draw, "choice", ("group", "sym", "zero")) if f in INT_FORMATS else "")
                        for f in formats)
    limit = draw(st.floats(min(_most_bits(f) for f in formats), 32, allow_nan=False))
    metric = draw(st.sampled_from(METRICS))
    return f"precision {sel} choose {{{choices}}} budget avg_bits<={format_value(round(limit, 2))} by {metric}"


def _most_bits(fmt: str) -> float:
    """The most bits per weight `fmt` can take with its scales: an integer format's fp16 scale and
    zero point (16 + 16 bits at most) per group of 16 (the smallest) add 2. A budget at the
    nominal bits (`avg_bits<=4` over int4) was out of reach and refused: 5 draws in 60."""
    return FORMAT_BITS[fmt] + (2 if fmt in INT_FORMATS else 0)


@st.composite
def _token_rules(draw, blocks: int) -> list[str]:
    rules = ["tokens unpad"] if draw(st.booleans()) else []
    # a merge or prune after the last block is refused (it saves nothing): none when one block is left
    if blocks >= 2 and draw(st.booleans()):
        i = draw(st.integers(0, blocks - 2))
        action = draw(st.sampled_from(["merge", "prune"]))
        rules.append(f"tokens after blocks[{i}] {action}" + _params(draw, f"tokens.{action}", tuple(SCHEMAS[f"tokens.{action}"])))
    return rules
