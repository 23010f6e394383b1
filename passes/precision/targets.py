"""What both precision rules share: the rule's targets as the graph is now (weight, linear
sites, bias), their calibration Hessians, and applying the chosen encodings to the graph with a
report measured on the stored tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...calibration import DEFAULT_TOKENS
from ...dsl import ast as A
from ...dsl.errors import Diagnostic, SpecError
from ...runtime.formats import QuantizedWeight
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..calibrate import CALIB_HINT, NO_CALIB, DiagonalAccumulator, merged, observe
from ..context import Context, rule_error
from ..estimate import distinct_sizes
from ..graph import ModelGraph, Target
from ..rewrite import (TIED_NOTE, LinearSite, find_sites, release_unread, tied_storages, weight_name,
                       weight_still_held)
from .encode import HALF, Candidate, Encoded, NotFinite, OutOfRange, encode, encoded_bytes
from .gptq import HessianAccumulator
from .rewrite import to_half, to_quant_linear
from ...runtime.forward_parts import recompile

__all__ = ["Item", "items_of", "hessians_of", "require_calib", "apply", "few_tokens_note"]


@dataclass
class Item:
    """A target being rewritten: its fresh index entry, linear sites and fp32 [out, in] weight."""

    target: Target
    sites: list[LinearSite]
    w: torch.Tensor
    bias_numel: int
    bias_bytes: int
    stored: torch.dtype  # the weight's own dtype: what `keep` stores (w is an fp32 copy)

    @property
    def path(self) -> str:
        return self.target.path


def items_of(graph: ModelGraph, bound: BoundRule) -> list[Item]:
    """The rule's targets as the graph is now (an earlier pass may have rewritten it)."""
    items = []
    for t in bound.targets:
        target = graph.targets.get(t.path)
        if target is None:
            raise SpecError.at("unsupported", f"{t.path} is no longer in the graph (an earlier rule removed it), "
                               f"so `{bound.text}` cannot quantize it", line=bound.line,
                               column=bound.rule.span.column, hint="narrow the selector")
        stored = graph.param(weight_name(target)).detach()
        w = (stored.T if target.transposed else stored).float()
        bias = [graph.param(p) for p in target.params if p != weight_name(target)]
        items.append(Item(target, find_sites(graph, target), w, sum(b.numel() for b in bias),
                          sum(b.numel() * b.element_size() for b in bias), stored.dtype))
    return items


def hessians_of(graph: ModelGraph, items: list[Item], ctx: Context, bound: BoundRule,
                who: str, diagonal: bool = False) -> dict[str, HessianAccumulator | DiagonalAccumulator]:
    """path -> H = E[x xᵀ] of its linear's input over the calibration tokens (only its diagonal
    with `diagonal`). Targets reading the same value (q/k/v, gate/up) share one accumulator; a
    target read at several sites (a linear called twice) gets the rows of all of them, and a
    target sharing one of those values only that value's (it got the other site's rows too)."""
    make = DiagonalAccumulator if diagonal else HessianAccumulator
    require_calib(ctx, bound, who)
    by_input: dict = {}
    for it in items:
        for site in it.sites:
            by_input.setdefault(site.x, make())
    observe(graph, {x: [acc.add] for x, acc in by_input.items()}, ctx.calib, ctx.progress,
            f"calibrating for `{bound.rule.kind}` (line {bound.line})")
    return {it.path: site_hessians(it, by_input) for it in items}


def site_inputs(it: Item) -> list:
    """The values `it` reads, each once, in site order: one, or several for a linear called twice."""
    return list(dict.fromkeys(site.x for site in it.sites))


def site_hessians(it: Item, by_input: dict) -> HessianAccumulator:
    """The accumulator of every row `it` reads: its one input's, or all its sites' merged."""
    return merged([by_input[x] for x in site_inputs(it)])


# What each calibrated step can do without calibration instead (the hint's last clause): the
# rule's other choices, never the one the user already wrote.
INSTEAD = {"GPTQ": "use method=rtn", "clip=output": "use clip=mse (the weights' own rounding error)",
           "the budget solver": "use a `quantize` rule with one format (no budget to solve)"}


def out_of_range(bound: BoundRule, ctx: Context, it: Item, cand, e: Exception) -> SpecError:
    """A target the format cannot hold (a weight past fp16's range), named at the rule: it was
    stored as inf silently, or a ValueError that named no linear."""
    # a budget scores every offered format on every target: "offer bf16" where bf16 was offered
    # beside the int4 that cannot hold it did not help
    instead = f"take {cand} out of the choices" if isinstance(bound.rule, A.Precision) else \
        "offer a format that holds it (bf16, int8 per channel)"
    return rule_error(bound, ctx, "out-of-range", f"{it.path} cannot be stored as {cand}: {e}",
                      f"leave it out (`keep {it.path}`, or narrow the selector), or {instead}")


def formats_by_reason(unheld: list[tuple[object, Exception]]) -> dict[str, list[str]]:
    """reason -> the formats that cannot hold a weight for it, in the order offered."""
    by_reason: dict[str, list[str]] = {}
    for cand, e in unheld:
        by_reason.setdefault(str(e), []).append(str(cand))
    return by_reason


def none_holds(bound: BoundRule, ctx: Context, it: Item, unheld: list[tuple[object, Exception]]) -> SpecError:
    """A budget's target that no offered format can hold, each format's reason named once."""
    reasons = "; ".join(f"{', '.join(cands)}: {why}" for why, cands in formats_by_reason(unheld).items())
    return rule_error(bound, ctx, "out-of-range", f"{it.path} cannot be stored in any offered format ({reasons})",
                      f"leave it out (`keep {it.path}`, or narrow the selector), or offer bf16 among the choices "
                      "(it holds weights up to 3.4e38)")


def encode_item(bound: BoundRule, ctx: Context, dead: "DeadInputs", it: Item, cand, H: torch.Tensor | None, *,
                method: str, clip: str, refit: bool, refuse_unheld: bool = True) -> Encoded:
    """`it` in `cand` (encode.py, with the rule's damp and act_order), its dead inputs noted for
    GPTQ and a weight the format cannot hold refused at the rule: what `quantize` and `precision`
    both do per target. With `refuse_unheld` false that weight raises OutOfRange instead, for a
    budget to choose among the formats that hold it."""
    if cand.format in HALF and it.stored == HALF[cand.format]:
        return None  # already in it: re-stored as it was, it only cost a copy before each call
    if method == "gptq":
        dead.watch(it, H)
    rule = bound.rule
    try:
        # every method that reads H, not GPTQ alone: RTN's scoring handed NaN costs to the budget
        # solver (a raw ValueError), and clip=output kept every group's full range, silently
        if H is not None and not bool(torch.isfinite(H).all()):
            raise NotFinite("its inputs on the calibration batches hold NaN or inf (the model computes them there)")
        return encode(it.w, cand, method, H, rule.get("damp"), rule.get("act_order"), clip, refit)
    except OutOfRange as e:
        if not refuse_unheld:
            raise
        raise out_of_range(bound, ctx, it, cand, e) from None
    except NotFinite as e:  # a raw ValueError that named neither the linear nor the rule
        raise rule_error(bound, ctx, "unsupported", f"{it.path} cannot be quantized: {e}",
                         f"leave it out (`keep {it.path}`, or narrow the selector) until it is fixed") from None


class DeadInputs:
    """Inputs of a GPTQ target that no calibration token activated (a zero on H's diagonal): GPTQ
    zeroes their weight columns, as the reference does, and the report says so (an all-zero
    weight from calibration of zeros came with no word)."""

    def __init__(self):
        self.count: dict[str, tuple[int, int]] = {}

    def watch(self, it: Item, H: torch.Tensor | None) -> None:
        if H is not None and H.dim() == 2:
            dead = int((H.diagonal() == 0).sum())
            if dead:
                self.count[it.path] = (dead, H.shape[0])

    def notes(self) -> tuple[str, ...]:
        if not self.count:
            return ()
        path, (dead, width) = max(self.count.items(), key=lambda kv: kv[1][0] / kv[1][1])
        more = f" and {len(self.count) - 1} more linears" if len(self.count) > 1 else ""
        return (f"GPTQ zeroed the weights of inputs no calibration token activated ({path}: {dead} of {width}{more}): "
                "calibrate on more, or more varied, text if those inputs matter",)


def require_calib(ctx: Context, bound: BoundRule, who: str) -> None:
    if not ctx.calib:
        raise SpecError(Diagnostic("missing-value", f"{who} needs calibration inputs, and {NO_CALIB}",
                                   bound.line, bound.rule.span.column, len(bound.rule.kind),
                                   f"{CALIB_HINT}; or {_instead(who)}"), ctx.source, ctx.filename)


def _instead(who: str) -> str:
    return next((v for k, v in INSTEAD.items() if k in who), INSTEAD["the budget solver"])


def apply(graph: ModelGraph, bound: BoundRule, items: list[Item], chosen: dict[str, tuple[Candidate, Encoded]],
          details: dict, ctx: Context, notes: tuple[str, ...] = ()) -> RuleReport:
    """Rewrite every target; report bytes measured on the stored tensors (and `notes` beside the
    rule's own). The weights of targets a later `adapt … init=error` reads are kept in
    `ctx.originals` (the first precision rule's)."""
    # each storage once, as plan counts: two linears reading one tied weight counted it twice (32 KiB
    # → 8 KiB for a model of 16 KiB, a saving of 4× where it was 2×), and an earlier rule's adapter
    # beside the weight counted too
    params, before = distinct_sizes([it.target for it in items], graph)
    after, weights, packed = 0, 0, 0
    kept, tied = [], []
    shared = tied_storages(graph, [it.target for it in items])
    sharing = _sharing_a_weight(graph, items)  # read before the rewrite retires the weights
    for it in items:
        cand, enc = chosen[it.path]
        # Found again: a target rewritten before this one may have been its input (ELECTRA's
        # embeddings_project feeds the first query), and its old node is gone.
        sites = find_sites(graph, it.target) if enc is not None else it.sites
        if it.path in ctx.keep_originals:
            ctx.originals.setdefault(it.path, it.w)  # no pass writes a weight in place (lent.py)
        if enc is None:
            kept.append((it.path, cand.format))
        elif isinstance(enc, QuantizedWeight):
            to_quant_linear(graph, it.target, sites, enc)
        else:
            to_half(graph, it.target, sites, enc)
    release_unread(graph, shared)  # a weight tied among rewritten targets is read by none now
    for it in items:
        _, enc = chosen[it.path]
        held = enc is not None and weight_still_held(graph, it.target)
        tied += [it.path] if held else []
        after += encoded_bytes(enc, it) + it.bias_bytes + (it.target.nbytes - it.bias_bytes if held else 0)
        weights += it.w.numel()
        packed += encoded_bytes(enc, it)
    recompile(graph.module)  # the module's generated forward still reads the old weights
    details = {**details, "bits_per_weight": 8 * packed / weights, "weights": weights}
    # a tied weight encoded for each of its linears is stored as that many copies (as plan counts)
    params_after = sum(it.w.numel() + it.bias_numel for it in items)
    return RuleReport(bound.line, bound.text, bound.rule.kind, tuple(it.path for it in items),
                      params, params_after, before, after, details,
                      _notes(bound, kept, tied) + _wide_groups(items, chosen) + _packed_copies(sharing, chosen)
                      + notes)


def _sharing_a_weight(graph: ModelGraph, items) -> list[list[str]]:
    """The groups (two or more) of this rule's targets that read one tied weight."""
    by_weight: dict[int, list[str]] = {}
    for it in items:
        name = weight_name(it.target)
        if name in it.target.tied:
            storage = next(p.storage for p in graph.modules[it.path].params if p.name == name)
            by_weight.setdefault(storage, []).append(it.path)
    return [paths for paths in by_weight.values() if len(paths) > 1]


def _packed_copies(sharing: list[list[str]], chosen) -> tuple[str, ...]:
    """Linears of one rule that share a tied weight are each encoded and stored on their own (the
    fp32 original goes): said, not left for the user to find in the bytes."""
    notes = []
    for group in sharing:
        paths = [path for path in group if chosen[path][1] is not None]
        if len(paths) > 1:
            notes.append(f"{', '.join(paths)} share one weight (tied): it is stored as {len(paths)} packed copies, "
                         "one per linear, each encoded for that linear")
    return tuple(notes)


def _wide_groups(items, chosen) -> tuple[str, ...]:
    """A group wider than a linear's inputs is one group per row there (per-channel): said, not
    clamped without a word (`group=1048576` on 64 inputs)."""
    wide = [(it, cand.group) for it in items for cand, enc in [chosen[it.path]]
            if enc is not None and cand.group is not None and cand.group > it.w.shape[1]]
    if not wide:
        return ()
    (first, group), narrowest = wide[0], min(it.w.shape[1] for it, _ in wide)
    return (f"group={group} is wider than the inputs of {len(wide)} target{'s' if len(wide) != 1 else ''} "
            f"(e.g. {first.path}: {first.w.shape[1]}; narrowest {narrowest}): one group per row there, "
            "as per-channel",)


def _notes(bound: BoundRule, kept: list[tuple[str, str]], tied: list[str]) -> tuple[str, ...]:
    # bind's tied warning is a guess made before the rewrite (a sharer rewritten by an earlier
    # rule still held the weight then); after it, `tied` says whether the original stayed.
    notes = [w for w in bound.warnings if tied or TIED_NOTE not in w]
    for fmt in dict.fromkeys(f for _, f in kept):
        n = sum(f == fmt for _, f in kept)
        notes.append(f"{n} target{'s' if n != 1 else ''} kept in full precision (`keep`)" if fmt == "keep" else
                     f"{n} target{'s' if n != 1 else ''} already {fmt}: left as {'they are' if n != 1 else 'it is'}")
    if tied and not any(TIED_NOTE in w for w in bound.warnings):  # bind said it already
        notes.append(f"{', '.join(tied)}: {TIED_NOTE}")
    return tuple(notes)


def few_tokens_note(what: str, tokens: int | None, items: list[Item]) -> tuple[str, ...]:
    """A note when `what` (GPTQ, the budget's scores) read fewer calibration tokens than its widest
    target has inputs: every XᵀX is then rank-deficient, and the result fits those tokens, not the
    model's text. Two short texts (`calib=["a text", "another"]`, 4 tokens) compiled without a word."""
    widest = max((it.w.shape[1] for it in items), default=0)
    if tokens is None or tokens >= widest:
        return ()
    return (f"{what} read {tokens:,} calibration tokens, fewer than the {widest} inputs of its widest target: "
            "its statistics cannot pin the weights down and fit those tokens, not the model's text; calibrate on "
            f"more (the default is {DEFAULT_TOKENS:,} tokens of built-in text; calib=N, or --calib-tokens N, "
            "takes N)",)
