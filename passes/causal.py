"""Is the captured model causal? The token rules must know: `merge` is refused on a causal model (a
merged token would see positions after its own), and `prune` keeps and scores tokens differently.

Hugging Face's generating models derive from GenerationMixin, but a causal model need not: a bare
Qwen2Model, CLIP's text model. So the graph is also asked directly: its first block runs on a batch
of made-up token ids and again with the last token changed; the model is causal when no earlier
position's output moved. Decided once per graph, before a token rule changes it.
"""
from __future__ import annotations

import operator
import weakref

import torch
from torch import fx

from ..runtime import token_ops
from ..runtime.inputs import FILLABLE, complete_inputs
from ..runtime.token_ids import token_ids_input
from .calibrate import observe
from .graph import ModelGraph

__all__ = ["is_causal", "causality", "merge_refusal"]

aten = torch.ops.aten

_DECIDED: "weakref.WeakKeyDictionary[ModelGraph, bool | None]" = weakref.WeakKeyDictionary()

# The probe's size where the graph leaves it free: two rows, so that a batch of one is never the
# size it was specialized to, and positions enough to see attention reach ahead.
_BATCH, _SEQ = 2, 8


def is_causal(graph: ModelGraph) -> bool:
    """Causal as the probe sees it; a model it cannot probe counts as not causal."""
    return causality(graph) is True


def causality(graph: ModelGraph) -> bool | None:
    """True: causal; False: some position reads a later token (an encoder, a masked LM); None: the
    probe cannot tell (no token ids an embedding reads, another input it cannot make up)."""
    if "GenerationMixin" in graph.modules[""].classes:
        return True
    if graph not in _DECIDED:
        _DECIDED[graph] = _earlier_positions_ignore_later_tokens(graph)
    return _DECIDED[graph]


def _earlier_positions_ignore_later_tokens(graph: ModelGraph) -> bool | None:
    # The token ids are the integer input an embedding table reads, whatever forward calls it:
    # asked for `input_ids` alone, a decoder taking `tokens` was "not causal", merged, and pruned
    # away its last position.
    ids_name, embedding = token_ids_input(graph)
    ids_info = next((i for i in graph.inputs if i.name == ids_name), None)
    others = [i.name for i in graph.inputs if i.name != ids_name and i.name not in FILLABLE]
    if ids_info is None or embedding is None or others or not graph.blocks or graph.blocks[0].output is None:
        return None  # no token ids to probe with (a ViT's pixels): no telling
    vocab, device = embedding.shape[0], embedding.device
    batch, seq = (s if isinstance(s, int) else d for s, d in zip(ids_info.shape, (_BATCH, _SEQ)))
    if seq < 2:
        return None
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(ids_info.dtype)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % vocab
    rows: list[torch.Tensor] = []
    batches = [_probe_inputs(graph, ids_name, x.to(device)) for x in (ids, changed)]
    if any(i.name not in batches[0] for i in graph.inputs):
        return None  # an input the probe cannot make (a 4-D mask): no telling
    observe(graph, {_stream_per_position(graph.blocks[0].output): [lambda r: rows.append(r.float())]}, batches)
    earlier = torch.ones(batch, seq, dtype=torch.bool)
    earlier[:, -1] = False
    a, b = (r[earlier.reshape(-1).to(r.device)] for r in rows)
    # Exact on the models tried; a margin for kernels that sum masked-out zeros in another order.
    return bool((a - b).abs().max() <= 1e-5 * a.abs().max().clamp_min(1e-30))


def _probe_inputs(graph: ModelGraph, ids_name: str, ids: torch.Tensor) -> dict:
    """The probe's call: its ids and what a call may leave out, filled — position_ids and
    token_type_ids too where a call must give them (a model that numbers positions its own way,
    runtime/inputs.py): the two runs compared take the same ones, so any will do (the probe of
    RoBERTa captured with them said "calibration batch 0 lacks inputs ['position_ids']")."""
    inputs = complete_inputs({ids_name: ids}, graph.inputs)
    for info in graph.inputs:  # token-shaped ones: a 4-D mask of the model's own is not made up
        if info.name in FILLABLE and info.name not in inputs and len(info.shape) == 2:
            inputs[info.name] = FILLABLE[info.name](*ids.shape, info.dtype, ids.device)
    return inputs


def _stream_per_position(out):
    """The block's output, or what enters the token step that ends the block (a CompiledModel
    compiled again, merged after block 0): the probe compares positions, and a merge or prune
    leaves fewer rows than positions. Packed or padded, its rows are then one per position in
    batch-major order (the probe's tokens are all real)."""
    step = out.args[0] if out.target is operator.getitem and isinstance(out.args[0], fx.Node) else None
    if step is not None and step.target in (token_ops.token_merge, token_ops.token_prune):
        return step.args[0]
    return out


def merge_refusal(graph: ModelGraph) -> tuple[str, str] | None:
    """(message, hint) when `tokens … merge` cannot apply: the model is causal. Said by bind (so
    `plan` says it, and compile before any pass runs) and by the merge pass itself."""
    if not is_causal(graph):
        return None
    return (f"`tokens … merge` averages tokens, and {graph.model_class} is causal (each position sees only "
            "those before it): a merged token would see positions after its own",
            "merge tokens of encoders (and ViTs); on decoders, `prune`")
