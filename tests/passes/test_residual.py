"""passes/residual.py: which residual-stream value a block linear's output is added to, on the tiny
architectures (by name), and that value against the Hugging Face model's own residual stream
(hooks) at the same calibration rows."""
from __future__ import annotations

import pytest
import torch

from slimfx.passes.residual import block_stream, residual_partner
from slimfx.passes.rewrite import find_sites
from slimfx.passes.stream import Stream

from passes_tiny import captured, token_batches

# arch -> the block-0 linears (path below the block) whose output joins the residual stream directly.
# Gemma2 normalises each sublayer's output before the add, GPT-NeoX adds attention and MLP first
# (parallel residual), BERT's FFN output joins the stream that comes out of a LayerNorm: none there.
JOINING = {
    "llama": {"self_attn.o_proj", "mlp.down_proj"},
    "phi3": {"self_attn.o_proj", "mlp.down_proj"},
    "gemma2": set(),
    "gpt2": {"attn.c_proj", "mlp.c_proj"},
    "gpt_neox": set(),
    "opt": {"self_attn.out_proj", "fc2"},
    "bert": {"attention.output.dense"},
}


def _partners(graph, block):
    order = {n: i for i, n in enumerate(graph.module.graph.nodes)}
    stream = block_stream(block, order)
    out = {}
    for t in graph.targets.values():
        if t.block == block.index and t.kind == "linear":
            site = find_sites(graph, t)[0]
            out[t.path.removeprefix(block.path + ".")] = (site, residual_partner(site, stream), stream)
    return out


@pytest.mark.parametrize("arch", sorted(JOINING))
def test_the_linears_whose_output_joins_the_residual_stream(arch):
    graph = captured(arch).graph
    block = graph.blocks[0]
    partners = _partners(graph, block)
    assert {p for p, (_, r, _) in partners.items() if r is not None} == JOINING[arch]
    for site, r, stream in partners.values():
        if r is not None:
            # the same values as the output (GPT-2's addmm is [tokens, out], viewed back to 3-d)
            assert r in stream and r.meta["val"].numel() == site.node.meta["val"].numel()


def test_the_partner_holds_the_models_residual_stream_where_the_output_joins_it():
    """Llama: o_proj's partner is the block's input, down_proj's the input plus o_proj's output —
    checked against hooks on the Hugging Face model over the same batches (Stream.rows)."""
    cap = captured("llama")
    graph, model = cap.graph, cap.model
    batches = token_batches(2, 2, 9)
    layer = model.model.layers[1]
    seen = {"h": [], "o": []}
    hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs: seen["h"].append(
                 args[0] if args else kwargs["hidden_states"]), with_kwargs=True),
             layer.self_attn.o_proj.register_forward_hook(lambda m, args, out: seen["o"].append(out))]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    partners = _partners(graph, graph.blocks[1])
    for name, want in (("self_attn.o_proj", seen["h"]),
                       ("mlp.down_proj", [h + o for h, o in zip(seen["h"], seen["o"])])):
        site, r, _ = partners[name]
        stream = Stream(graph, batches)
        stream.run_through(site.x, {})  # the add reading r comes after the linear: r is held
        for got, w in zip(stream.rows(r), want):
            torch.testing.assert_close(got, w.reshape(-1, w.shape[-1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="does not hold"):
        stream.rows(graph.blocks[0].input)  # read by nothing still to run: let go
