"""Role tables: which modules are targets (linear / embedding / norm / conv), what each does,
and which ModuleList holds the transformer blocks.

ModelGraph indexing (passes/graph.py) asks `find_blocks`, `module_kind` and `infer_role`;
selectors (passes/select.py) then address targets by these roles. All knowledge of Hugging Face
module names lives here, in ordered (pattern, role) tables: first match wins.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

__all__ = [
    "pm_kinds", "pm_block_roles", "pm_top_roles", "FUSED_ROLES", "module_kind", "infer_role",
    "find_blocks",
]

# ---- kinds: (class name that must appear in the MRO, or a regex on the class name, kind) ------
# GPT-2's Conv1D is a linear with a transposed weight ([in, out]); it is indexed as a linear.
pm_kinds: list[tuple[str, str]] = [
    ("Linear", "linear"),
    ("Conv1D", "linear"),
    ("Embedding", "embedding"),
    ("LayerNorm", "norm"),
    ("RMSNorm", "norm"),
    (r".*(RMSNorm|LayerNorm)$", "norm"),  # LlamaRMSNorm, Gemma2RMSNorm, T5LayerNorm, …
    ("_ConvNd", "conv"),  # ViT's patch embedding
]


def module_kind(mro: Iterable[str]) -> str | None:
    """The target kind of a module from its class names (most derived first), else None."""
    mro = tuple(mro)
    for pattern, kind in pm_kinds:
        if pattern in mro or (pattern.startswith(".*") and re.fullmatch(pattern, mro[0])):
            return kind
    return None


# ---- roles inside a block: (regex on the path relative to the block, role) --------------------
# First match wins; patterns fullmatch the relative path. Attention containers differ per family:
# self_attn (Llama…), attn (GPT-2), attention (NeoX, DistilBERT, ViT), attention.self (BERT),
# attention.attention (ViT before transformers 5), attention.attn (MPNet).
_ATTN = r"(?:(?:self_attn|self_attention|attn|attention)(?:\.(?:self|attention|attn))?|layer\.0\.SelfAttention)"
_MLP = r"(?:mlp|feed_forward|ffn|layer\.\d+\.DenseReluDense)"  # T5: layer.1 (encoder), layer.2 (decoder)

pm_block_roles: list[tuple[str, str]] = [
    (rf"{_ATTN}\.(?:q_proj|query|query_proj|q_lin|q)", "attn.q"),  # query_proj: DeBERTa-v2
    (rf"{_ATTN}\.(?:k_proj|key|key_proj|k_lin|k)", "attn.k"),
    (rf"{_ATTN}\.(?:v_proj|value|value_proj|v_lin|v)", "attn.v"),
    (rf"{_ATTN}\.(?:qkv_proj|c_attn|query_key_value|Wqkv|qkv)", "attn.qkv"),
    (rf"{_ATTN}\.(?:o_proj|out_proj|out_lin|c_proj|dense|o|Wo)", "attn.o"),  # o: MPNet, T5; Wo: ModernBERT
    (r"(?:attention|attn)\.output\.dense", "attn.o"),  # BERT, ViT (transformers 4)
    (rf"{_ATTN}\.q_norm", "attn.q_norm"),  # Qwen3, Gemma3
    (rf"{_ATTN}\.k_norm", "attn.k_norm"),
    (rf"{_MLP}\.(?:gate_up_proj|Wi)", "mlp.gate_up"),  # Phi-3, ModernBERT
    (rf"{_MLP}\.(?:gate_proj|w1|wi_0)", "mlp.gate"),
    (rf"{_MLP}\.(?:up_proj|c_fc|dense_h_to_4h|fc1|lin1|w3|wi|wi_1)", "mlp.up"),
    (rf"{_MLP}\.(?:down_proj|c_proj|dense_4h_to_h|fc2|lin2|w2|wo|Wo)", "mlp.down"),
    (r"fc1|intermediate\.dense", "mlp.up"),  # OPT keeps fc1/fc2 in the layer; BERT, ViT (tf 4)
    (r"fc2|output\.dense", "mlp.down"),
    # Every other norm directly in the block: input_layernorm, post_attention_layernorm,
    # pre/post_feedforward_layernorm (Gemma2), ln_1/ln_2 (GPT-2), self_attn_layer_norm and
    # final_layer_norm (OPT), attention.output.LayerNorm/output.LayerNorm (BERT),
    # sa_layer_norm/output_layer_norm (DistilBERT), layernorm_before/after (ViT).
    (r".*", "norm"),  # only norms reach here with a match: _kind_fits checks the kind
]

# ---- roles outside the blocks: (regex on the full module path, role) --------------------------
pm_top_roles: list[tuple[str, str]] = [
    (r"(?:\w+\.)*(?:embed_tokens|wte|embed_in|word_embeddings)", "embed"),
    (r"(?:\w+\.)*patch_embeddings\.projection", "embed"),  # ViT: a Conv2d over patches
    (r"(?:\w+\.)*(?:wpe|embed_positions|position_embeddings)", "embed.pos"),
    (r"(?:\w+\.)*token_type_embeddings", "embed.type"),
    (r"(?:\w+\.)*embeddings\.(?:LayerNorm|layer_norm|norm)", "embed.norm"),
    # Any prefix, as for the embeddings: a PeftModel (`base_model.model.lm_head`) or a user's
    # wrapper module nests them deeper, and `keep head` was told the model had no head.
    (r"(?:\w+\.)*(?:norm|ln_f|final_layer_norm|final_layernorm|layernorm|decoder\.final_layer_norm"
     r"|decoder\.norm)", "final_norm"),
    (r"(?:\w+\.)*(?:lm_head|embed_out|score|qa_outputs|vocab_projector|classifier(?:\.out_proj)?"
     r"|cls\.predictions\.decoder)", "head"),
    # becomes `head` when the model has no other head; ALBERT's pooler is the linear itself
    (r"(?:\w+\.)*pooler(?:\.dense)?", "pooler"),
]

# A role that does not exist because the model fuses it into another: role -> (fused, what).
FUSED_ROLES: dict[str, tuple[str, str]] = {
    "attn.q": ("attn.qkv", "query, key and value projections"),
    "attn.k": ("attn.qkv", "query, key and value projections"),
    "attn.v": ("attn.qkv", "query, key and value projections"),
    "mlp.gate": ("mlp.gate_up", "gate and up projections"),
    "mlp.up": ("mlp.gate_up", "gate and up projections"),
}

def infer_role(path: str, kind: str, block_path: str | None) -> str | None:
    """The role of target `path`: from pm_block_roles on the path relative to its block, or from
    pm_top_roles outside any block. Norm roles only go to norms, projections to linears."""
    if block_path is not None:
        rel = path[len(block_path) + 1:]
        return _first_match(pm_block_roles, rel, kind)
    return _first_match(pm_top_roles, path, kind)


def _first_match(table: list[tuple[str, str]], path: str, kind: str) -> str | None:
    for pattern, role in table:
        if re.fullmatch(pattern, path) and _kind_fits(role, kind):
            return role
    return None


def _kind_fits(role: str, kind: str) -> bool:
    if role.endswith("norm"):
        return kind == "norm"
    if role == "embed":
        return kind in ("embedding", "conv")
    if role.startswith("embed."):
        return kind == "embedding"
    return kind == "linear"


# ---- the blocks ------------------------------------------------------------------------------


def find_blocks(modules: Mapping[str, Any], compute: Mapping[str, int]) -> str | None:
    """The path of the transformer blocks: the ModuleList/Sequential whose children are
    structurally identical and hold the most graph nodes (`compute`: path -> node count,
    from nn_module_stack). Ties go to the shallowest path; None if nothing repeats."""
    best, best_key = None, None
    for path, info in modules.items():
        if not info.is_list or not info.children:
            continue
        kids = [f"{path}.{c}" if path else c for c in info.children]
        if not _repeated([_structure(k, modules) for k in kids]):
            continue
        total = sum(compute.get(k, 0) for k in kids)
        key = (total, -path.count("."))
        if total and (best_key is None or key > best_key):
            best, best_key = path, key
    return best


def _repeated(structures: list[tuple]) -> bool:
    """The same block, over and over. The first may differ, as models build it: T5's first block
    alone holds the relative position table (an extra module the later blocks read), ModernBERT's
    first layer has an Identity for its attention norm (the embeddings' norm comes just before)."""
    if len(set(structures)) == 1:
        return True
    first, rest = dict(structures[0]), structures[1:]
    if len(set(rest)) != 1 or first.get("") != dict(rest[0]).get(""):
        return False
    return all(p in first and (first[p] == cls or "Identity" in (first[p], cls)) for p, cls in rest[0])


def _structure(path: str, modules) -> tuple:
    """Paths and classes of a module and everything under it, relative to `path`. Shapes and
    tensor names are left out on purpose: blocks pruned to different widths are still the blocks,
    and so are blocks of which some were rewritten by a rule for them alone (a quantized linear
    holds qweight/scales instead of weight, an adapted one lora_A/lora_B beside it), or the
    index would lose the blocks after `quantize blocks[0]…` and every later rule with it."""
    n = len(path)
    return tuple((p[n:], info.cls) for p, info in modules.items() if p == path or p.startswith(path + "."))
