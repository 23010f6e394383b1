"""Tiny randomly initialised Hugging Face models of every supported architecture, captured once
per test session (per xdist worker) and shared by the capture, graph and selector tests.

A plain module with a unique name (not conftest) so that test files can import it."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from slimfx.models import DECODER_ARCHS, tiny
from slimfx.passes.capture import capture
from slimfx.passes.graph import ModelGraph

DECODERS = DECODER_ARCHS


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
    # eager attention everywhere: Gemma2 has no other, and one setting keeps the tests uniform.
    return tiny(arch, seed=seed, attn_implementation="eager").model


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


def token_batches(n: int = 3, rows: int = 2, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n calibration batches of random token ids below 100 (every tiny model's vocabulary), no padding."""
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 100, (rows, length), generator=gen),
             "attention_mask": torch.ones(rows, length, dtype=torch.long)} for _ in range(n)]


def assert_same_codes(cm, codes: dict[str, torch.Tensor], bits: int) -> None:
    """At least 99.9% of the compiled model's codes equal a direct loop's (path -> unpacked codes;
    a code may round the other way where the two sum Hessians in another order)."""
    from slimfx.runtime.formats import unpack

    state = cm.state_dict()
    same = total = 0
    for path, want in codes.items():
        got = unpack(state[f"program.{path}.qweight"], bits, want.shape[1])
        same += int((got == want).sum())
        total += want.numel()
    assert same / total >= 0.999, f"{total - same} of {total} codes differ from the direct loop"


def linear_input_hessians(model: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    """H = E[x xᵀ] of every block nn.Linear's input (".layers." in its path), from forward hooks
    on the Hugging Face model itself: the reference the precision and adapter tests compare with."""
    from slimfx.passes.calibrate import HessianAccumulator

    accs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            accs[name] = HessianAccumulator(torch.float64)
            hooks.append(m.register_forward_hook(lambda mod, args, out, n=name: accs[n].add(args[0])))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    return {n: a.H for n, a in accs.items()}


class Wide(torch.nn.Module):
    """One 256 → 64 linear: a single adapter target whose byte counts are easy to write down."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.proj = torch.nn.Linear(256, 64)

    def forward(self, x):
        return self.proj(x)
