"""What a `collapse` or `drop` may do with the blocks it selects: checks bind (so that `plan`
refuses what compile would) and the collapse pass share. Core, as block_reads.py is."""
from __future__ import annotations

from ..dsl import ast as A
from .graph import Block

__all__ = ["auto_count", "angular_room", "collapse_range_problem", "merge_problem", "full_precision_problem"]


def auto_count(rule: A.Rule, candidates: list[int], n_blocks: int) -> tuple[int, tuple[str, str] | None]:
    """(blocks an auto rule removes: `count`, else round(ratio × the model's blocks); (message,
    hint) when the candidates (block indices) cannot give that many, else None). One block always
    stays, and a LaCo merge keeps one of the selected blocks to merge into (`count=N` on N blocks
    searched nothing, silently). An angular drop never takes the last block and its runs never
    touch: `plan` said "ready" for `drop blocks[-1:] auto(count=1, score=angular)`, which compile
    refused after scoring every block."""
    auto = rule.auto
    count = auto.get("count") or round(auto.get("ratio") * n_blocks)
    if count < 1:
        return count, (f"ratio={auto.get('ratio')} of {n_blocks} blocks removes none",
                       "raise the ratio, or write count=1")
    angular = isinstance(rule, A.Drop) and auto.get("score") == "angular"
    most = angular_room(candidates, n_blocks, auto.get("max_run")) if angular else len(candidates)
    room = max(0, min(most - isinstance(rule, A.Collapse), n_blocks - 1))
    if count > room:
        why = (" (LaCo keeps one selected block to merge the others into)" if isinstance(rule, A.Collapse) else
               f" (angular runs never include the last block, and runs of at most max_run={auto.get('max_run')} "
               "never touch each other)" if angular else "")
        return count, (f"`{rule.kind} … auto` asks for {count} block{'s' * (count != 1)}, and only {room} of the "
                       f"model's {n_blocks} blocks may go{why}", "lower count/ratio, or widen the selector or the `keep`"
                       + (", or raise max_run" if angular else ""))
    return count, None


def angular_room(candidates: list[int], n_blocks: int, max_run: int) -> int:
    """The most blocks runs of at most `max_run` candidates, never touching each other and never
    the last block, can hold: a stretch of L contiguous candidates holds L − ⌊L/(max_run+1)⌋."""
    allowed = sorted(set(candidates) - {n_blocks - 1})
    room, length = 0, 0
    for k, i in enumerate(allowed):
        length = length + 1 if k and i == allowed[k - 1] + 1 else 1
        if k + 1 == len(allowed) or allowed[k + 1] != i + 1:
            room += length - length // (max_run + 1)
    return room


def collapse_range_problem(blocks) -> tuple[str, str] | None:
    """(message, hint) when an explicit `collapse`'s blocks are not one contiguous range (LaCo merges
    a run into its first block), else None. Shared by bind (`plan`) and the collapse pass (compile)."""
    indices = sorted(b.index for b in blocks)
    ranges = (1 if indices else 0) + sum(b != a + 1 for a, b in zip(indices, indices[1:]))
    if ranges == 1:
        return None
    return (f"`collapse` merges one contiguous range of blocks, and the selector gives {ranges} ranges",
            "write one range, e.g. `collapse blocks[20:24]`")


def merge_problem(graph, keep: Block, merged: list[Block]) -> tuple[str, str] | None:
    """(message, hint) when LaCo cannot merge `merged` into `keep`: their float parameters differ in
    name or shape (T5's first block alone holds the position table; ModernBERT's first layer has
    no attention norm, so merging into it dropped the next layer's silently); else None."""
    tied = _tied_outside(graph, keep, merged)
    if tied is not None:
        return (f"`collapse` writes the merged weights into {keep.path}, and {tied[0]} is one tensor with "
                f"{tied[1]} (a weight tied across blocks): the merge would change that block too",
                "give each block its own copy of the weight before compiling (e.g. `layer.mlp.down_proj.weight "
                "= nn.Parameter(w.clone())`), or collapse other blocks")
    own = _float_params(graph, keep)
    for b in merged:
        other = _float_params(graph, b)
        if other == own:
            continue
        name = next(n for n in sorted(own.keys() | other.keys()) if own.get(n) != other.get(n))
        if name not in other:
            why = f"{keep.path}{name} has no counterpart in {b.path}"
        elif name not in own:
            why = f"{b.path}{name} has no counterpart in {keep.path}"
        else:
            why = f"{keep.path}{name} is {list(own[name])} and {b.path}{name} {list(other[name])}"
        return (f"`collapse` merges blocks built alike, and {why}",
                "collapse a range of blocks of one form (a model whose first block differs: start after it)")
    return None


def _tied_outside(graph, keep: Block, merged: list[Block]) -> tuple[str, str] | None:
    """(a parameter of `keep`, the same tensor's name in a module outside the merged run): LaCo
    puts a new tensor wherever the old one was, and the graph reads a tied tensor under one name
    only, so a block sharing it would take the merge too (neither can keep the original)."""
    def under(path: str, blocks) -> bool:
        return any(path == b.path or path.startswith(b.path + ".") for b in blocks)

    own = {p.storage: p.name for path, info in graph.modules.items() if under(path, [keep])
           for p in info.params if not p.is_buffer}  # buffers are not merged
    return next(((own[p.storage], p.name) for path, info in graph.modules.items()
                 if not under(path, [keep, *merged]) for p in info.params if p.storage in own), None)


def _float_params(graph, block: Block) -> dict[str, tuple[int, ...]]:
    """A block's floating-point parameters by their name relative to it ('.mlp.up_proj.weight')."""
    out = {}
    for path, info in graph.modules.items():
        if path == block.path or path.startswith(block.path + "."):
            for p in info.params:
                if not p.is_buffer and p.dtype.startswith(("float", "bfloat")):
                    out[p.name[len(block.path):]] = tuple(p.shape)
    return out


def full_precision_problem(graph, blocks) -> tuple[str, str] | None:
    """A LaCo merge adds weights up; over a CompiledModel compiled again, a quantized linear's
    fp16 scales were summed beside codes left as they were (0.69 off), and adapters' A and B
    each on their own (B·A is not their sum): refused, as the same order in one policy is."""
    for t in (graph.targets[p] for b in blocks for p in b.targets if p in graph.targets):
        if t.kind != "linear":
            continue
        info = graph.modules[t.path]
        names = {p.name.rpartition(".")[2] for p in info.params}
        if "base_layer" in info.children:
            return (f"`collapse` merges full-precision weights without adapters, and {t.path} is a PEFT "
                    "adapter layer", "merge the adapters into the model first "
                    "(`peft_model.merge_and_unload()`), or remove blocks with `drop`")
        why = ("an earlier compile quantized it" if "weight" not in names else
               "an adapter from an earlier compile sits on it" if "lora_A" in names else None)
        if why is not None:
            return (f"`collapse` merges full-precision weights without adapters, and {t.path}: {why}",
                    "collapse the model before quantizing it or adding adapters (merge them first: "
                    "cm.merge_adapters()), or remove blocks with `drop`")
    return None
