"""The policy AST: frozen dataclasses the parser builds and every later stage reads.

parse() text -> Spec -> check() -> bind (passes/select.py) -> passes. Positions (`span`) and
comments (`trivia`) ride along for error messages and `slimfx fmt`, but never take part in
equality: two policies that differ only in layout or comments are the same policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

__all__ = [
    "Span", "Trivia", "Item", "Slice", "Name", "Star", "GlobStar", "Alternatives", "Path",
    "Selector", "Param", "Auto", "FormatChoice", "Budget", "Collapse", "Drop", "Adapt",
    "Quantize", "Precision", "Tokens", "Unpad", "Keep", "Heal", "Rule", "Policy", "Spec", "Value", "RULE_TYPES",
    "BLOCK_RULES",
]

Value = Union[bool, int, float, str]


@dataclass(frozen=True)
class Span:
    """1-based line and column of a node's first character, and of the character after it."""

    line: int
    column: int
    end_line: int
    end_column: int


NO_SPAN = Span(0, 0, 0, 0)


@dataclass(frozen=True)
class Trivia:
    """Comments and blank lines around a node, kept so that `slimfx fmt` loses nothing."""

    leading: tuple[str, ...] = ()  # whole-line comments above the node ("": a blank line among or below them)
    inline: str | None = None  # a comment after the node on its own line
    blank_before: bool = False  # at least one blank line above the first leading comment (or the node)


NO_TRIVIA = Trivia()


# ---- selectors -----------------------------------------------------------------------------
# `blocks[0:4].attn.{q,v} : Linear` is Selector(Path((Name("blocks", Slice(0, 4, None)),
# Name("attn"), Alternatives((Path((Name("q"),)), Path((Name("v"),)))))), "Linear").


@dataclass(frozen=True)
class Item:
    """`[i]`: one element of a repeated container; negative counts from the end."""

    index: int


@dataclass(frozen=True)
class Slice:
    """`[start:stop:step]` with Python semantics; None where the bound was left out."""

    start: int | None
    stop: int | None
    step: int | None = None


@dataclass(frozen=True)
class Name:
    """A module name or canonical name (`blocks`, `attn`, `q_proj`), optionally indexed."""

    name: str
    index: Item | Slice | None = None


@dataclass(frozen=True)
class Star:
    """`*`: exactly one level of any name."""


@dataclass(frozen=True)
class GlobStar:
    """`**`: any number of levels, zero included."""


@dataclass(frozen=True)
class Alternatives:
    """`{a,b.c}`: any of the sub-paths."""

    options: tuple["Path", ...]


Segment = Union[Name, Star, GlobStar, Alternatives]


@dataclass(frozen=True)
class Path:
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Selector:
    """A path plus an optional `: ClassName` filter on the matched modules."""

    path: Path
    class_filter: str | None = None
    span: Span = field(default=NO_SPAN, compare=False)


# ---- parameters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """`name=value`; the value already has the type its rule's schema asks for."""

    name: str
    value: Value
    span: Span = field(default=NO_SPAN, compare=False)


def _lookup(params: tuple[Param, ...], name: str) -> Param | None:
    return next((p for p in params if p.name == name), None)


class _HasParams:
    """Mixin: `rule.get("rank")` is the written value or the schema default."""

    params: tuple[Param, ...]
    kind: str

    def get(self, name: str) -> Value | None:
        found = _lookup(self.params, name)
        if found is not None:
            return found.value
        from .schema import default_for  # late: schema imports this module

        return default_for(self, name)


@dataclass(frozen=True)
class Auto(_HasParams):
    """`auto(ratio=0.25, threshold=0.9)`: let a search pick the blocks. `of` is the rule keyword."""

    of: str
    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    kind = "auto"


@dataclass(frozen=True)
class FormatChoice(_HasParams):
    """One candidate of `precision … choose {int8, int4 group=32}`."""

    format: str
    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    kind = "choice"


@dataclass(frozen=True)
class Budget:
    """`budget avg_bits<=4.5` or `budget bytes<=64MiB` (unit kept as written, None for bytes)."""

    metric: str  # "avg_bits" | "bytes"
    limit: int | float
    unit: str | None = None
    span: Span = field(default=NO_SPAN, compare=False)

    @property
    def limit_value(self) -> float:
        """The limit in bits per weight, or in bytes."""
        from .schema import SIZE_UNITS

        return self.limit * SIZE_UNITS[self.unit] if self.unit else self.limit


# ---- rules ---------------------------------------------------------------------------------
# Every rule has `selector`, `params`, `span`, `trivia`, and a class-level `kind` (its keyword).
# `heal` and `tokens unpad` have no selector of their own: their `selector` is None.


@dataclass(frozen=True)
class Collapse(_HasParams):
    """`collapse <blocks> [auto(...)]`: LaCo-merge the selected blocks into the first of them."""

    selector: Selector
    auto: Auto | None = None
    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    trivia: Trivia = field(default=NO_TRIVIA, compare=False)
    kind = "collapse"


@dataclass(frozen=True)
class Drop(_HasParams):
    """`drop <blocks> [auto(...)]`: remove blocks, explicitly or by block influence."""

    selector: Selector
    auto: Auto | None = None
    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    trivia: Trivia = field(default=NO_TRIVIA, compare=False)
    kind = "drop"


@dataclass(frozen=True)
class Adapt(_HasParams):
    """`adapt <linears> lora|dora rank=16 alpha=32`."""

    selector: Selector
    method: str  # "lora" | "dora"
    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    trivia: Trivia = field(default=NO_TRIVIA, compare=False)
    kind = "adapt"


@dataclass(frozen=True)
class Quantize(_HasParams):
    """`quantize <linears> int4 group=64 method=gptq`."""

    selector: Selector
    format: str
    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    trivia: Trivia = field(default=NO_TRIVIA, compare=False)
    kind = "quantize"


@dataclass(frozen=True)
class Precision(_HasParams):
    """`precision <linears> choose {...} budget avg_bits<=6 by output_mse`."""

    selector: Selector
    choices: tuple[FormatChoice, ...]
    budget: Budget
    metric: str
    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    trivia: Trivia = field(default=NO_TRIVIA, compare=False)
    kind = "precision"


@dataclass(frozen=True)
class Tokens(_HasParams):
    """`tokens after <block> prune keep=0.5` or `… merge ratio=0.25`."""

    selector: Selector
    action: str  # "prune" | "merge"
    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    trivia: Trivia = field(default=NO_TRIVIA, compare=False)
    kind = "tokens"


@dataclass(frozen=True)
class Unpad(_HasParams):
    """`tokens unpad`: remove the padding tokens of a batch, so later rules see real tokens only.

    It acts on the whole batch, so it takes no selector (`selector` is None) and no parameters,
    and it comes before every `tokens after` rule of its policy (dsl/check.py). Its `kind` is
    "tokens", like `Tokens`; `action` is "unpad", so its schema key is "tokens.unpad".
    """

    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    trivia: Trivia = field(default=NO_TRIVIA, compare=False)
    kind = "tokens"
    selector = None  # class attributes, not fields: code that reads `rule.selector` gets None
    action = "unpad"


@dataclass(frozen=True)
class Keep(_HasParams):
    """`keep <selector>`: no rule of the policy touches these targets."""

    selector: Selector
    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    trivia: Trivia = field(default=NO_TRIVIA, compare=False)
    kind = "keep"


@dataclass(frozen=True)
class Heal(_HasParams):
    """`heal method=linear|lora …`: repair what the `collapse`/`drop` rules before it removed.

    It acts on the seams those rules left, so it takes no selector (`selector` is None).
    """

    params: tuple[Param, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    trivia: Trivia = field(default=NO_TRIVIA, compare=False)
    kind = "heal"
    selector = None  # class attribute, not a field: code that reads `rule.selector` gets None

    @property
    def method(self) -> str | None:
        """"linear" or "lora" (None only in an AST that skipped validation)."""
        return self.get("method")


Rule = Union[Collapse, Drop, Adapt, Quantize, Precision, Tokens, Unpad, Keep, Heal]
RULE_TYPES: tuple[type, ...] = (Collapse, Drop, Adapt, Quantize, Precision, Tokens, Unpad, Keep, Heal)
# The rules that remove blocks: later rules bind to the blocks left, and a `heal` repairs their cuts.
BLOCK_RULES: tuple[type, ...] = (Collapse, Drop)


@dataclass(frozen=True)
class Policy:
    """`policy name { rules }`: rules apply in order."""

    name: str
    rules: tuple[Rule, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    trivia: Trivia = field(default=NO_TRIVIA, compare=False)
    closing: Trivia = field(default=NO_TRIVIA, compare=False)  # comments before `}`
    # The text it was parsed from, so that a Policy passed alone (`compile(model, spec.policies[0])`)
    # still shows its errors' lines with a caret: they printed an empty line under "<policy>:1:21".
    source: str = field(default="", compare=False, repr=False)
    filename: str = field(default="<policy>", compare=False, repr=False)


@dataclass(frozen=True)
class Spec:
    """A whole policy file: zero or more policies. The empty spec changes nothing."""

    policies: tuple[Policy, ...] = ()
    source: str = field(default="", compare=False, repr=False)
    filename: str = field(default="<policy>", compare=False)
    trailing: Trivia = field(default=NO_TRIVIA, compare=False)

    def policy(self, name: str | None = None) -> Policy:
        """The named policy, or the only one. Raises KeyError/ValueError with the names."""
        names = [p.name for p in self.policies]
        if name is None:
            if len(self.policies) == 1:
                return self.policies[0]
            raise ValueError(f"{self.filename} holds {len(names)} policies ({', '.join(names) or 'none'}); name one")
        for p in self.policies:
            if p.name == name:
                return p
        raise KeyError(f"no policy `{name}` in {self.filename}; it has: {', '.join(names) or 'none'}")
