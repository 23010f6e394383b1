"""Tiny randomly initialised Hugging Face models of every supported architecture, captured once
per test session (per xdist worker) and shared by the capture, graph and selector tests.

A plain module with a unique name (not conftest) so that test files can import it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import transformers as tf

from slimfx.passes.capture import capture
from slimfx.passes.graph import ModelGraph

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
               intermediate_size=128)

# arch -> (config class, model class, config kwargs). attn_implementation="eager": Gemma2 has
# no other; the rest also capture bit-exact with "sdpa", but one setting keeps tests uniform.
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_COMMON, num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_COMMON, pad_token_id=0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_COMMON, num_key_value_heads=2, head_dim=16)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_inner=128, n_positions=128)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_COMMON)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                 ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128)),
    "bert": ("BertConfig", "BertModel", dict(_COMMON)),
    "roberta": ("RobertaConfig", "RobertaModel", dict(_COMMON, pad_token_id=1)),
    "distilbert": ("DistilBertConfig", "DistilBertModel",
                   dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, hidden_dim=128)),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 image_size=32, patch_size=8, num_labels=3)),
}
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2", "gpt_neox", "opt")


# Block 0 per architecture: (blocks container, attn.q, mlp.down, embed, head, final_norm).
# A fused arch lists its fused module under attn.q ("fused:" prefix) — resolution must refuse.
# ViT lists the transformers-5 names and, after `|`, the older ones.
EXPECTED: dict[str, tuple[str, str, str, str, str | None, str | None]] = {
    "llama": ("model.layers", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
              "model.embed_tokens", "lm_head", "model.norm"),
    "mistral": ("model.layers", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                "model.embed_tokens", "lm_head", "model.norm"),
    "qwen2": ("model.layers", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
              "model.embed_tokens", "lm_head", "model.norm"),
    "qwen3": ("model.layers", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
              "model.embed_tokens", "lm_head", "model.norm"),
    "phi3": ("model.layers", "fused:model.layers.0.self_attn.qkv_proj",
             "model.layers.0.mlp.down_proj", "model.embed_tokens", "lm_head", "model.norm"),
    "gemma2": ("model.layers", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
               "model.embed_tokens", "lm_head", "model.norm"),
    "gpt2": ("transformer.h", "fused:transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
             "transformer.wte", "lm_head", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "fused:gpt_neox.layers.0.attention.query_key_value",
                 "gpt_neox.layers.0.mlp.dense_4h_to_h", "gpt_neox.embed_in", "lm_head|embed_out",
                 "gpt_neox.final_layer_norm"),
    "opt": ("model.decoder.layers", "model.decoder.layers.0.self_attn.q_proj",
            "model.decoder.layers.0.fc2", "model.decoder.embed_tokens", "lm_head",
            "model.decoder.final_layer_norm"),
    "bert": ("encoder.layer", "encoder.layer.0.attention.self.query",
             "encoder.layer.0.output.dense",
             "embeddings.word_embeddings", "pooler.dense", None),
    "roberta": ("encoder.layer", "encoder.layer.0.attention.self.query",
                "encoder.layer.0.output.dense", "embeddings.word_embeddings", "pooler.dense", None),
    "distilbert": ("transformer.layer", "transformer.layer.0.attention.q_lin",
                   "transformer.layer.0.ffn.lin2", "embeddings.word_embeddings", None, None),
    "vit": ("vit.layers|vit.encoder.layer",
            "vit.layers.0.attention.q_proj|vit.encoder.layer.0.attention.attention.query",
            "vit.layers.0.mlp.fc2|vit.encoder.layer.0.output.dense",
            "vit.embeddings.patch_embeddings.projection", "classifier", "vit.layernorm"),
}


def one_of(expected: str, actual: str | None) -> bool:
    return actual in expected.split("|")


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    cfg_name, model_name, kwargs = ARCHS[arch]
    config = getattr(tf, cfg_name)(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    return getattr(tf, model_name)(config).eval()


def example_inputs(arch: str, batch: int = 2, seq: int = 7,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}
    ids = torch.randint(3, 256, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # real padding, so masks flow through the graph
    return {"input_ids": ids, "attention_mask": mask}


def state_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    """Every tensor of the state dict as raw bytes: equality here is bit-identity."""
    return {k: v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


@dataclass
class Captured:
    arch: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    graph: ModelGraph
    before: dict[str, bytes]  # the model's state before capture
    seconds: float


_SESSION: dict[str, Captured] = {}


def captured(arch: str) -> Captured:
    """The session's capture of `arch` (exported once per worker)."""
    if arch not in _SESSION:
        model, inputs = tiny_model(arch), example_inputs(arch)
        before = state_bytes(model)
        start = time.perf_counter()
        graph = capture(model, inputs)
        _SESSION[arch] = Captured(arch, model, inputs, graph, before, time.perf_counter() - start)
    return _SESSION[arch]
