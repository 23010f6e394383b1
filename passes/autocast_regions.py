"""Regions where a model's own code turns autocast off, kept through capture.

transformers 5.17 computes the rotary frequencies of its RoPE decoders (Llama, Mistral, Qwen,
Phi-3, Gemma 2, GPT-NeoX) as a float32 matmul under `maybe_autocast(device, enabled=False)`, which
returns a null context unless autocast is on already. Export runs outside autocast, so it recorded
a plain `aten.matmul`; a compiled model called under the caller's `torch.autocast` computed it in
bfloat16, and export's dtype checks refused every call ("Tensor dtype mismatch").

While capture exports, `recording()` makes `maybe_autocast` return a real `torch.autocast`, which
export records as a `wrap_with_autocast` region. `inline()` then puts each region that turns
autocast off back into the graph, its matmuls as `slimfx::matmul_without_autocast`
(runtime/autocast_ops.py): one graph of aten and slimfx ops, as the artifact format, the passes
and the code generator take it. Outside autocast nothing changes: the same ops in the same dtypes.
"""
from __future__ import annotations

import contextlib
import operator
import sys

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


@contextlib.contextmanager
def recording():
    """`maybe_autocast` always a real `torch.autocast` in every module that imported it, for
    export to record its regions; put back after."""
    generic = sys.modules.get("transformers.utils.generic")
    original = getattr(generic, "maybe_autocast", None)
    if original is None:  # transformers not loaded, or a version without it
        yield
        return
    holders = [m for m in list(sys.modules.values()) if getattr(m, "__dict__", {}).get("maybe_autocast") is original]
    for module in holders:
        module.maybe_autocast = _real_autocast
    try:
        yield
    finally:
        for module in holders:
            module.maybe_autocast = original


def inline(gm: fx.GraphModule) -> int:
    """Each `wrap_with_autocast` region of `gm` that turns autocast off, replaced by its body with
    its matmuls computed without autocast; how many. A region that turns autocast on stays."""
    hop = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
    done = 0
    for node in list(gm.graph.nodes):
        if hop is None or node.op != "call_function" or node.target is not hop:
            continue
        _device, _dtype, enabled, _cache, body_ref, *args = node.args
        if enabled or body_ref.op != "get_attr" or any(u.target is not operator.getitem for u in node.users):
            continue
        body = getattr(gm, body_ref.target)
        env = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], args))
        results = None
        with gm.graph.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    results = inner.args[0]
                    break
                copied = gm.graph.node_copy(inner, lambda n: env[n])
                if copied.op == "call_function" and copied.target in _MATMULS:
                    copied.target = matmul_without_autocast
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
