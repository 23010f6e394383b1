"""Regions where a model's own code turns autocast off, kept through capture.

transformers 5.17 computes the rotary frequencies of its RoPE decoders (Llama, Mistral, Qwen,
Phi-3, Gemma 2, GPT-NeoX) as a float32 matmul under `maybe_autocast(device, enabled=False)`, which
returns a null context unless autocast is on already. Export runs outside autocast, so it recorded
a plain `aten.matmul`; a compiled model called under the caller's `torch.autocast` computed it in
bfloat16, and export's dtype checks refused every call ("Tensor dtype mismatch").

While capture exports, `recording()` makes `maybe_autocast` return a real `torch.autocast`, which
export records as a `wrap_with_autocast` region. `inline()` then puts each region that turns
autocast off back into the graph, its matmuls (matmul, mm, bmm) as
`slimfx::matmul_without_autocast` (runtime/autocast_ops.py): one graph of aten and slimfx ops, as
the artifact format, the passes and the code generator take it. Outside autocast nothing changes:
the same ops in the same dtypes. A region holding another op autocast changes (addmm, baddbmm,
linear, conv) is left a region: the graph computes it as the model does, and saving the compiled
model refuses it by name (runtime/program_check.py).
"""
from __future__ import annotations

import contextlib
import operator
import sys
import threading

import torch
from torch import fx

from ..runtime.autocast_ops import matmul_without_autocast

__all__ = ["recording", "inline"]

_aten = torch.ops.aten
# The products autocast computes in its lower dtype that such a region holds (the rotary's `@`).
_MATMULS = {_aten.matmul.default, _aten.mm.default, _aten.bmm.default}


def _real_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
    if device_type == "meta":  # as transformers' own: no autocast for the meta device
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


_patch_lock = threading.Lock()
_patched: list = []  # [depth, the original, the modules patched] while any capture records


@contextlib.contextmanager
def recording():
    """`maybe_autocast` always a real `torch.autocast` in every module that imported it, for
    export to record its regions; put back when the last capture that asked leaves (captures in
    two threads overlap: the second took the first one's patch for the original, and kept it)."""
    with _patch_lock:
        if _patched:
            _patched[0] += 1
        else:
            generic = sys.modules.get("transformers.utils.generic")
            original = getattr(generic, "maybe_autocast", None)  # None: transformers not loaded, or no such helper
            holders = [] if original is None else [
                m for m in list(sys.modules.values()) if getattr(m, "__dict__", {}).get("maybe_autocast") is original]
            for module in holders:
                module.maybe_autocast = _real_autocast
            _patched[:] = [1, original, holders]
    try:
        yield
    finally:
        with _patch_lock:
            _patched[0] -= 1
            if _patched[0] == 0:
                _, original, holders = _patched
                for module in holders:
                    module.maybe_autocast = original
                _patched.clear()


def inline(gm: fx.GraphModule) -> int:
    """Each `wrap_with_autocast` region of `gm` that turns autocast off, replaced by its body with
    its matmuls computed without autocast; how many. A region that turns autocast on stays, and so
    does one holding another op autocast would change (a linear): the graph then computes it as
    the model does, and saving it is refused by name."""
    hop = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
    done = 0
    for node in list(gm.graph.nodes):
        if hop is None or node.op != "call_function" or node.target is not hop:
            continue
        device, _dtype, enabled, _cache, body_ref, *args = node.args
        if enabled or body_ref.op != "get_attr" or any(u.target is not operator.getitem for u in node.users):
            continue
        body = getattr(gm, body_ref.target)
        inline(body)  # its own regions first: what is left of them is in its graph then
        if any(_autocast_changes(n.target, str(device)) for n in body.graph.nodes if n.op == "call_function"):
            continue
        env = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], args))
        results = None
        with gm.graph.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    results = inner.args[0]
                    break
                if inner.op == "get_attr":  # a region the body keeps (one that turns autocast on)
                    copied = gm.graph.get_attr(_adopt(gm, body, inner.target))
                    copied.meta = dict(inner.meta)
                else:
                    copied = gm.graph.node_copy(inner, lambda n: env[n])
                if copied.op == "call_function" and copied.target in _MATMULS:
                    # the region's device: a region that turns off CUDA's autocast leaves the CPU's on
                    copied.target, copied.args = matmul_without_autocast, (*copied.args, torch.device(device))
                env[inner] = copied
        results = results if isinstance(results, (tuple, list)) else (results,)
        for user in list(node.users):
            user.replace_all_uses_with(env[results[user.args[1]]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not body_ref.users:
            gm.graph.erase_node(body_ref)
            gm.delete_submodule(body_ref.target)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _adopt(gm: fx.GraphModule, body: fx.GraphModule, target: str) -> str:
    """`body`'s attribute `target` set on `gm` under a name `gm` does not use yet; that name."""
    value, name, i = getattr(body, target), target, 0
    while hasattr(gm, name):
        i += 1
        name = f"{target}_{i}"
    if isinstance(value, torch.nn.Module):
        gm.add_submodule(name, value)
    else:
        setattr(gm, name, value)
    return name


# Ops autocast only promotes to their inputs' widest dtype, as type promotion does without it.
_PROMOTED = {"cat", "stack", "index_copy", "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot",
             "grid_sampler", "index_put", "scatter_add", "tensordot"}


def _autocast_changes(target, device: str) -> bool:
    """Whether `device`'s autocast computes `target` otherwise than it runs without it — beyond
    the matmuls inline() swaps: an op with a kernel of its own under that autocast (the
    dispatcher's list: lower precision or float32), other than the promoting ones."""
    if target in _MATMULS or not isinstance(target, torch._ops.OpOverload):
        return False  # getitem, or a region kept in the body (one that turns autocast on)
    schema = target._schema
    if schema.name.partition("::")[2] in _PROMOTED:
        return False
    name = schema.name + (f".{schema.overload_name}" if schema.overload_name else "")
    key = _AUTOCAST_KEYS.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)


_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU", "mps": "AutocastMPS"}
