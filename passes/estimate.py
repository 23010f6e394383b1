"""Size estimates for `slimfx plan`: parameters and bytes before -> after, from the rule alone.

Estimates are arithmetic on shapes (no weight is read), so a plan of a 135M-parameter model
answers in the time it takes to capture it. The passes report the measured figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..dsl import ast as A
from ..dsl.schema import FORMAT_BITS, HALF_DTYPES

__all__ = ["Estimate", "distinct_sizes", "estimate", "quantized_bytes", "stored_after", "leaves_as_is"]

SCALE_BYTES = 2  # fp16 scales and float zero points


@dataclass(frozen=True)
class Estimate:
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    note: str = ""
    infeasible: bool = False  # the rule cannot do what it says (bind.py makes it a SpecError)


def estimate(rule: A.Rule, targets, blocks, graph, stored: dict[str, int] | None = None,
             cuts: int | None = None, rewritten: frozenset[str] | set[str] = frozenset()) -> Estimate:
    """`stored`: bytes of targets as the rules above this one leave them (an adapter over an int4
    linear sits beside its packed weight, not the fp32 one). `cuts`: how many gaps the rules
    before a `heal` leave (None where an auto rule decides them at compile). `rewritten`: the
    linears whose float weight the rules above replaced (a tied original no longer read by them)."""
    if isinstance(rule, A.Quantize):
        return _quantize(rule, targets, graph, rewritten)
    if isinstance(rule, A.Precision):
        return _precision(rule, targets, graph, rewritten)
    if isinstance(rule, A.Adapt):
        return _adapt(rule, targets, stored or {})
    if isinstance(rule, A.BLOCK_RULES):
        return _remove_blocks(rule, blocks, graph)
    if isinstance(rule, A.Tokens):
        return _tokens(rule)
    if isinstance(rule, A.Unpad):
        return Estimate(note="computes on the real tokens of a padded batch; attention per sequence")
    if isinstance(rule, A.Heal):
        return _heal(rule, graph, cuts, targets)
    params, nbytes = distinct_sizes(targets, graph)
    return Estimate(params, params, nbytes, nbytes,
                    f"{len(targets)} target{'s' if len(targets) != 1 else ''} left as {'they are' if len(targets) != 1 else 'it is'}")


def distinct_sizes(targets, graph) -> tuple[int, int]:
    """(params, bytes) of the targets with tied weights counted once (`keep {embed,head}` on a
    model whose head is its embedding holds one matrix, not two)."""
    seen, params, nbytes = set(), 0, 0
    for t in targets:
        for info in graph.modules[t.path].params:
            if info.name in t.params and info.storage not in seen:
                seen.add(info.storage)
                params += math.prod(info.shape)
                nbytes += info.nbytes
    return params, nbytes


def quantized_bytes(out_features: int, in_features: int, fmt: str, group: int | None, sym: bool,
                    zero: str = "int") -> int:
    """Bytes of one packed weight: codes plus fp16 scales, and zero points when asymmetric (whole
    ones packed `bits` bits each per row, float ones fp16)."""
    bits = FORMAT_BITS[fmt]
    if fmt not in ("int8", "int4", "int2"):
        return out_features * in_features * bits // 8
    if group is None and fmt != "int8":
        group = 64
    groups = 1 if group is None else math.ceil(in_features / group)  # ragged last group counts whole
    codes = out_features * math.ceil(in_features * bits / 8)
    scales = out_features * groups * SCALE_BYTES
    if sym:
        return codes + scales
    zeros = groups * SCALE_BYTES if zero == "float" else math.ceil(groups * bits / 8)
    return codes + scales + out_features * zeros


def _numel(target) -> int:
    return sum(math.prod(s) for s in target.shapes)


def _weight_shape(target) -> tuple[int, int]:
    shape = target.shapes[0]
    out_f, in_f = (shape[1], shape[0]) if getattr(target, "transposed", False) else (shape[0], shape[1])
    return out_f, in_f


def _element_bytes(target) -> float:
    """Bytes per stored number of the target: 2 on a bf16 model (every size here was fp32's 4)."""
    numel = _numel(target)
    return target.nbytes / numel if numel else 4.0


def _held(targets, graph, rewritten, unchanged) -> int:
    """Bytes of the tied weights a rule on `targets` leaves in memory beside what it stores: a
    target's original float weight stays for another module sharing it (GPT-2's embedding, under
    its tied head) unless every sharer is rewritten, by this rule or one above (compile then frees
    it: rewrite.release_unread); once per tensor; none where the rule leaves the weight as it is
    (`unchanged(target, weight)`: `keep`, or the half dtype it already has)."""
    seen, total = set(), 0
    paths = {t.path for t in targets} | set(rewritten)
    for t in targets:
        weight = _weight_info(t, graph) if t.tied else None
        if weight is None or weight.storage in seen or unchanged(t, weight):
            continue
        seen.add(weight.storage)
        sharers = {path for path, info in graph.modules.items() for p in info.params if p.storage == weight.storage}
        if sharers - paths:
            total += weight.nbytes
    return total


def _weight_info(target, graph):
    """The module table's row for the target's weight (its storage id says what shares it)."""
    return next((p for p in graph.modules[target.path].params if p.name == target.params[0]), None)


def _leaves_as_is(fmt: str, weight) -> bool:
    """`keep`, or a half format the weight already has ("already bf16: left as it is")."""
    return fmt == "keep" or HALF_DTYPES.get(fmt) == weight.dtype


def leaves_as_is(fmt: str, target, graph) -> bool:
    """A quantize/precision format that leaves the target's float weight as it is: `keep`, or the
    half dtype it already has (precision/targets.encode_item); a fold or merge still reaches it."""
    weight = _weight_info(target, graph)
    return fmt == "keep" or (weight is not None and _leaves_as_is(fmt, weight))


def _bias_bytes(target) -> int:
    return round(sum(math.prod(s) for s in target.shapes[1:]) * _element_bytes(target))


def _weight_bytes(t, fmt: str, group: int | None, sym: bool, zero: str = "int") -> int:
    """Bytes of t's weight in `fmt`; `keep` stores it as the model holds it."""
    if fmt == "keep":
        return round(math.prod(_weight_shape(t)) * _element_bytes(t))
    return quantized_bytes(*_weight_shape(t), fmt, group, sym, zero)


def stored_after(rule: A.Rule, targets, total: Estimate) -> dict[str, int]:
    """Per target, the bytes a quantize or precision rule leaves it (precision: its estimate
    `total` spread over the weights evenly); {} for other rules."""
    if isinstance(rule, A.Quantize):
        return {t.path: _quantized(rule, t) for t in targets}
    if isinstance(rule, A.Precision):
        share = total.bytes_after / total.bytes_before if total.bytes_before else 1.0
        return {t.path: int(t.nbytes * share) for t in targets}
    return {}


def _quantized(rule: A.Quantize, t) -> int:
    """The target's own bytes after the rule (a tied original it leaves behind apart: _held)."""
    return _weight_bytes(t, rule.format, rule.get("group"), rule.get("sym"), rule.get("zero")) + _bias_bytes(t)


def _quantize(rule: A.Quantize, targets, graph, rewritten) -> Estimate:
    # a weight tied between two targets is there once before, and encoded once per linear after
    params_before, before = distinct_sizes(targets, graph)
    held = _held(targets, graph, rewritten, lambda t, w: _leaves_as_is(rule.format, w))
    own = sum(_quantized(rule, t) for t in targets)
    params = sum(_numel(t) for t in targets)
    weights = sum(math.prod(_weight_shape(t)) for t in targets) or 1
    bits = 8 * (own - sum(_bias_bytes(t) for t in targets)) / weights
    return Estimate(params_before, params, before, own + held, f"≈{bits:.2f} bits/weight")


def _precision(rule: A.Precision, targets, graph, rewritten) -> Estimate:
    """The budget, held between what the candidates can reach: every target at its smallest
    format and at its largest (compile picks among them; a looser budget stops at the largest)."""
    params_before, before = distinct_sizes(targets, graph)
    weights = sum(math.prod(_weight_shape(t)) for t in targets)
    params = sum(_numel(t) for t in targets)
    bias = sum(_bias_bytes(t) for t in targets)
    options = [[_choice_bytes(c, t) for c in rule.choices] for t in targets]
    smallest, largest = sum(min(o) for o in options), sum(max(o) for o in options)
    if rule.budget.metric == "avg_bits":  # on the weights alone (codes and scales), as compile counts
        limit, floor, unit, extra = rule.budget.limit_value * weights / 8, 8 * smallest / max(weights, 1), \
            " bits/weight", bias
    else:  # on everything stored, biases too
        smallest, largest = smallest + bias, largest + bias
        limit, floor, unit, extra = rule.budget.limit_value, smallest, " bytes", 0
    if targets and limit < smallest * (1 - 1e-9):
        reach = f"{floor:,.0f}{unit}" if unit == " bytes" else f"{floor:.4g}{unit}"
        return Estimate(params_before, params, before, smallest + extra, f"cannot be met: the smallest achievable is "
                        f"{reach} (every target at its smallest format)", infeasible=True)
    # A tied weight's original stays for the module it is shared with, whatever is chosen: outside
    # the budget, as compile counts it, but in the bytes (plan showed 12 KiB where compile had 73);
    # not where a budget the largest formats meet leaves the weight as it is (a `keep` candidate).
    at_largest = limit >= largest
    biggest = {t.path: max(rule.choices, key=lambda c: _choice_bytes(c, t)).format for t in targets}
    held = _held(targets, graph, rewritten, lambda t, w: at_largest and _leaves_as_is(biggest[t.path], w))
    after = int(min(limit, largest)) + extra + held
    kept = f"; +{held:,} bytes of tied weights kept for the modules that share them" if held else ""
    return Estimate(params_before, params, before, after, f"at most {rule.budget.limit}{rule.budget.unit or ''} "
                    f"{'bits/weight' if rule.budget.metric == 'avg_bits' else ''}".strip() + kept)


def _choice_bytes(choice: A.FormatChoice, t) -> int:
    """Bytes of a target's weight in one candidate format (its bias apart)."""
    return _weight_bytes(t, choice.format, choice.get("group"), choice.get("sym"), choice.get("zero"))


def _adapt(rule: A.Adapt, targets, stored: dict[str, int]) -> Estimate:
    before = sum(stored.get(t.path, t.nbytes) for t in targets)
    if rule.get("from"):  # rank and method come from the adapter's config, read at compile
        params = sum(_numel(t) for t in targets)
        return Estimate(params, params, before, before, f"loaded from {rule.get('from')} at compile"
                        + ("; merged into the base weights" if rule.get("merge") else ""))
    # Bytes per element of A and B (`adapt … dtype=`): fp16/bf16 as the formats table says, fp32 4.
    rank, size = rule.get("rank"), FORMAT_BITS.get(rule.get("dtype"), 32) // 8
    low_rank = sum(rank * sum(_weight_shape(t)) for t in targets)  # A and B, stored in `dtype`
    magnitude = sum(_weight_shape(t)[0] for t in targets) if rule.method == "dora" else 0  # fp32 always
    added = low_rank + magnitude
    params = sum(_numel(t) for t in targets)
    if rule.get("merge"):
        return Estimate(params, params, before, before, "merged into the base weights")
    return Estimate(params, params + added, before, before + size * low_rank + 4 * magnitude,
                    f"+{added:,} trainable")


def _remove_blocks(rule, blocks, graph) -> Estimate:
    per_block = [sum(graph.targets[p].nbytes for p in b.targets if p in graph.targets) for b in blocks]
    params_per = [sum(_numel(graph.targets[p]) for p in b.targets if p in graph.targets) for b in blocks]
    before, params = sum(per_block), sum(params_per)
    if rule.auto is None:
        removed = len(blocks) - 1 if isinstance(rule, A.Collapse) else len(blocks)
        note = f"{removed} of {len(graph.blocks)} blocks removed"
    else:
        removed = rule.auto.get("count") or round(rule.auto.get("ratio") * len(graph.blocks))
        note = f"up to {removed} of {len(graph.blocks)} blocks removed (searched at compile)"
    mean, mean_params = (before / len(blocks), params / len(blocks)) if blocks else (0, 0)
    return Estimate(params, params - int(removed * mean_params), before, before - int(removed * mean), note)


def _heal(rule, graph, cuts: int | None, targets=()) -> Estimate:
    """A linear heal adds a d×d map per cut (none folded), in the stream's dtype; a LoRA heal adds
    nothing once merged, and its float32 A and B on `targets` (the linears beside the cuts) when
    kept (merge=false)."""
    if rule.get("method") == "linear":
        q = _stream_reader(graph)
        if rule.get("fold") or q is None:
            return Estimate(note="a least-squares map at each cut" + (", folded into the down projection before it"
                                                                      if rule.get("fold") else ""))
        hidden = _weight_shape(q)[1]
        if not cuts:  # an auto rule before it chooses the cuts at compile
            return Estimate(note=f"a least-squares map at each cut (+{hidden * hidden:,} params per cut)")
        added = cuts * hidden * hidden
        return Estimate(0, added, 0, round(added * _element_bytes(q)),
                        f"a {hidden}×{hidden} least-squares map at {'the cut' if cuts == 1 else f'each of {cuts} cuts'}")
    merged = "merged afterwards" if rule.get("merge") else "kept as adapters"
    written = f", on {rule.get('generate'):,}+ tokens the original writes first" if rule.get("generate") else ""
    note = (f"LoRA r={rule.get('rank')} beside each cut, {rule.get('steps')} steps"
            f"{' distilled from the original' if rule.get('distill') else ''}{written}, {merged}")
    if rule.get("merge") or not targets:
        return Estimate(note=note)
    added = sum(min(rule.get("rank"), *_weight_shape(t)) * sum(_weight_shape(t)) for t in targets)
    return Estimate(0, added, 0, 4 * added, f"{note} (+{added:,} trainable on {len(targets)} linears)")


def _stream_reader(graph):
    """A block's query linear: its input width is the residual stream's, its dtype the stream's."""
    for t in graph.targets.values():
        if t.block is not None and t.kind == "linear" and t.role in ("attn.q", "attn.qkv"):
            return t
    return None


def _tokens(rule: A.Tokens) -> Estimate:
    if rule.action == "prune":
        return Estimate(note=f"keeps {rule.get('keep'):.0%} of tokens after this block")
    return Estimate(note=f"merges {rule.get('ratio'):.0%} of tokens after this block")
