"""Outside references for the collapse tests, written directly on the Hugging Face modules (not
on slimfx's graph): a model with layers removed or merged, and the residual stream of each
layer read with forward hooks. A plain module (not conftest) so the test files can import it."""
from __future__ import annotations

import copy

import torch
from torch import nn


def layers_of(model: nn.Module, path: str) -> nn.ModuleList:
    return model.get_submodule(path)


def without_layers(model: nn.Module, path: str, removed: set[int]) -> nn.Module:
    """A deep copy of `model` whose ModuleList at `path` lacks the layers `removed`."""
    out = copy.deepcopy(model)
    parent_path, _, name = path.rpartition(".")
    parent = out.get_submodule(parent_path) if parent_path else out
    layers = getattr(parent, name)
    setattr(parent, name, nn.ModuleList([l for i, l in enumerate(layers) if i not in removed]))
    return out


def laco_merged(model: nn.Module, path: str, keep: int, merged: list[int]) -> nn.Module:
    """LaCo's RDSC merge done by hand: θ_keep + Σ (θ_k − θ_keep), then the merged layers removed."""
    out = copy.deepcopy(model)
    layers = layers_of(out, path)
    with torch.no_grad():
        for name, theta in layers[keep].named_parameters():
            delta = sum(dict(layers[k].named_parameters())[name] - theta for k in merged)
            theta.add_(delta)
    return without_layers(out, path, set(merged))


def tie_down_projections(model: nn.Module, a: int, b: int) -> nn.Module:
    """`model` (changed in place) with layer b's MLP down projection holding layer a's weight: one
    tensor two blocks read (export names it after one of them)."""
    layers = layers_of(model, "model.layers")
    layers[b].mlp.down_proj.weight = layers[a].mlp.down_proj.weight
    return model


def layer_streams(model: nn.Module, path: str, inputs: dict) -> list[torch.Tensor]:
    """Residual stream k = input of layer k (k = L: output of the last layer), real tokens only."""
    layers = layers_of(model, path)
    seen: list[torch.Tensor] = []
    hooks = [layers[0].register_forward_pre_hook(lambda m, args, kwargs: seen.append(_first(args, kwargs)),
                                                 with_kwargs=True)]
    hooks += [l.register_forward_hook(lambda m, args, out: seen.append(_first(out, {}))) for l in layers]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    mask = inputs.get("attention_mask")
    keep = mask.reshape(-1) != 0 if mask is not None else None
    rows = [s.reshape(-1, s.shape[-1]) for s in seen]
    return [r[keep] if keep is not None else r for r in rows]


def _first(args, kwargs) -> torch.Tensor:
    if isinstance(args, torch.Tensor):
        return args
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
    return kwargs["hidden_states"]


def mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def eager_tiny(arch="llama", layers=5, seed=21):
    """A tiny model with eager attention (the references hook its layers' inputs)."""
    from slimfx.models import tiny

    return tiny(arch, layers=layers, seed=seed, attn_implementation="eager")


def mapped_at(model, path: str, before_layer: int | None, t: torch.Tensor, final_norm: str | None = None):
    """`model` with h ← h @ T applied to what enters layer `before_layer` (or the final norm)."""
    hook = lambda m, args, kwargs: ((args[0] @ t,) + tuple(args[1:]), kwargs) if args else \
        (args, {**kwargs, "hidden_states": kwargs["hidden_states"] @ t})
    module = layers_of(model, path)[before_layer] if before_layer is not None else model.get_submodule(final_norm)
    module.register_forward_pre_hook(hook, with_kwargs=True)
    return model
