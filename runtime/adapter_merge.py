"""Folding adapters into their base weights: `W ← W + s·B@A` (LoRA) or
`W ← m/‖W + s·B@A‖ · (W + s·B@A)` per output row (DoRA), then the adapter's nodes and parameters
leave the graph. Used by `CompiledModel.merge_adapters()` (on a copy) and by `adapt … merge=true`.

A float weight of any width takes the fold, computed in float32 and rounded once to the weight's
own dtype (as PEFT's merge_and_unload does on a half model). A packed (quantized) weight, or one a
precision rule stored apart and casts on read, would have to be re-encoded, which is the precision
pass's job, and a weight tied to another module would change that module too. Those are refused
before anything is changed (never a partial merge).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import torch
from torch import fx, nn

from .adapters import Adapter, adapter_nodes, adapters_of, is_adapter_param, output_node
from .program import Program
from .report import Report, RuleReport, counted
from .masters import as_declared
from .sizes import tensor_bytes
from .forward_parts import recompile

__all__ = ["MergeError", "check_mergeable", "merge_adapters", "merged_weight", "merged_report"]

aten = torch.ops.aten
_FP_BASES = {aten.linear.default: 1, aten.addmm.default: 2, aten.mm.default: 1}  # op -> weight arg
QUANTIZED_HINT = ("Compile with the adapters on full-precision weights, train, call merge_adapters(), then "
                  "quantize the merged model: slimfx.compile(merged, \"quantize …\")")


class MergeError(ValueError):
    """An adapter that cannot be folded into its base weight; the message says what to do."""


def merged_weight(w: torch.Tensor, adapter: Adapter, a: torch.Tensor, b: torch.Tensor,
                  magnitude: torch.Tensor | None) -> torch.Tensor:
    """The folded weight, in `w`'s layout and dtype ([in, out] when the adapter is transposed):
    computed in float32 (or w's wider dtype) and rounded once."""
    wide = torch.promote_types(w.dtype, torch.float32)
    base = (w.T if adapter.transposed else w).to(wide)
    new = base + adapter.scale * (b.to(wide) @ a.to(wide))
    if adapter.method == "dora":
        norm = torch.linalg.norm(new, dim=1)
        norm = torch.where(norm != 0, norm, 1.0)  # an all-zero row stays zero (0/0 was NaN), as in the graph
        new = (magnitude.to(wide) / norm).unsqueeze(1) * new
    return (new.T if adapter.transposed else new).to(w.dtype).contiguous()


def merge_adapters(program: Program, paths: Iterable[str] | None = None) -> list[str]:
    """Fold the adapters of `paths` (default: all) into their weights, in place. Returns the paths."""
    gm = program.module
    found = adapters_of(gm)
    chosen = list(found) if paths is None else list(paths)
    missing = [p for p in chosen if p not in found]
    if missing:
        raise MergeError(f"no adapter on {', '.join(missing)}")
    plans = [(path, _weight_of(gm, path)) for path in chosen]  # every refusal before any change
    for path, (owner, attr) in plans:
        _fold(program, path, found[path], owner, attr)
    recompile(gm)
    return chosen


def check_mergeable(program: Program, paths: Iterable[str]) -> None:
    """Raise the MergeError merge_adapters would, changing nothing (a heal asks before it trains)."""
    for path in paths:
        _weight_of(program.module, path)


def _weight_of(gm: fx.GraphModule, path: str) -> tuple[nn.Module, str]:
    """(module, attribute) of the full-precision weight the adapter of `path` can be folded into."""
    weights = set()
    for out in output_node(gm, path):
        base = out.args[0]
        index = _FP_BASES.get(base.target) if base.op == "call_function" else None
        w = base.args[index] if index is not None else None
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            what = "quantized (slimfx::quant_linear)" if "quant_linear" in str(base.target) else \
                "stored in reduced precision" if index is not None else f"computed by {base.target}"
            raise MergeError(f"cannot merge the adapter of {path} into its base weight: the weight is {what}. "
                             + QUANTIZED_HINT)
        weights.add(w.target)
    if len(weights) != 1:
        raise MergeError(f"{path}: its base calls read {len(weights)} different weights {sorted(weights)}")
    name = weights.pop()
    owner_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_path)
    tensor = getattr(owner, attr)
    aliases = [n for n, t in gm.named_parameters(remove_duplicate=False) if t is tensor]
    aliases += [n for n, t in gm.named_buffers(remove_duplicate=False) if t is tensor]
    if len(aliases) > 1:
        raise MergeError(f"cannot merge the adapter of {path}: its weight {name} is tied to "
                         f"{', '.join(a for a in aliases if a != name)}, which would change too. Keep the "
                         "adapter unmerged (merge=false), or adapt a weight that is not tied")
    # half weights (a model cast to fp16/bf16) fold too: merged_weight computes in float32
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise MergeError(f"cannot merge the adapter of {path}: its weight is {tensor.dtype}. " + QUANTIZED_HINT)
    return owner, attr


def _fold(program: Program, path: str, adapter: Adapter, owner: nn.Module, attr: str) -> None:
    gm = program.module
    module = gm.get_submodule(path)
    w = getattr(owner, attr)
    new = merged_weight(w.detach(), adapter, module.lora_A.detach(), module.lora_B.detach(),
                        getattr(module, "lora_magnitude", None))
    owner._parameters[attr] = nn.Parameter(new, requires_grad=w.requires_grad)
    for out in output_node(gm, path):
        out.replace_all_uses_with(out.args[0])
    for node in reversed(adapter_nodes(gm, path)):
        gm.graph.erase_node(node)
    for name in [n for n in module._parameters if is_adapter_param(n)]:
        delattr(module, name)
    info = program.modules[path]
    program.modules[path] = replace(info, params=tuple(p for p in info.params if not is_adapter_param(p.name)))


def merged_report(report: Report, adapters: dict[str, Adapter], params: list[nn.Parameter], seconds: float) -> Report:
    """The report of `merge_adapters()`'s model: the compile it came from kept as history, then a
    row for the merge with the model's figures now (the compile's own counted the adapters' `params`,
    which are gone: its params and bytes after, and its rows, no longer described this model)."""
    # as stored: inside float32_masters a half adapter holds a float32 master (runtime/masters.py)
    n, nbytes = sum(p.numel() for p in params), tensor_bytes(*(as_declared(p) for p in params))
    row = RuleReport(0, "merge_adapters()", "merge", tuple(sorted(adapters)), n, 0, nbytes, 0,
                     notes=(f"{counted(len(adapters), 'adapter')} merged into {'its' if len(adapters) == 1 else 'their'} "
                            "weights",))
    return Report("merge_adapters()", report.model_class, (row,), report.params_after, report.params_after - n,
                  report.bytes_after, report.bytes_after - nbytes, seconds).after(report)
