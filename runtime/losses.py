"""The losses `slimfx.train` minimises (runtime/train.py), also read by the passes that train or
score through it: `lm` (next-token cross entropy over a batch's tokens: the heal's and the
Fisher-weighted budget's) and `distill` (KL to a teacher's logits, else the MSE of its first
output tensor), and why a captured program cannot be scored with `lm` before any batch runs."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .token_ids import token_ids_name

__all__ = ["distill_loss", "lm_loss", "lm_loss_problem", "reads_later_tokens", "NoTokenToPredict"]


class NoTokenToPredict(ValueError):
    """A batch whose rows are all padding or one token long: nothing for the lm loss to score (a
    caller summing over batches may pass it over)."""


def lm_loss_problem(program) -> str | None:
    """Why loss='lm' cannot score `program`'s outputs, read from its inputs and output structure
    before any batch runs (`plan` asks: a heal or budget that needs it failed only at compile);
    None where it can, or where the structure does not say (a registered output class)."""
    names = sorted(i.name for i in program.inputs)
    if not {token_ids_name(program), "labels"} & set(names):
        return f"loss='lm' scores the token ids an embedding reads (or labels), and the model takes {names}"
    spec = program.outputs.spec
    keyed = spec.type is dict or any(c.__name__ == "ModelOutput" for c in getattr(spec.type, "__mro__", ()))
    plain = spec.type in (tuple, list)  # a bare tensor may be logits (`return self.out(x)`): lm_loss decides
    if (keyed and "logits" not in list(spec.context or ())) or plain:
        return "loss='lm' needs a model whose output has logits (a causal LM); this one has none"
    return None


def lm_loss(out, batch: dict, ids: str = "input_ids") -> torch.Tensor:
    """Mean next-token cross entropy over the scored tokens (float32, whatever autocast did);
    `ids`: the input holding the token ids (runtime/token_ids.py), scored where no `labels` are."""
    logits = _logits(out)
    # a model of one's own returns its logits bare (`return self.out(x)`): "this one has none" was false
    bare = logits is None and isinstance(out, torch.Tensor) and out.dim() == 3
    logits = out if bare else logits
    if logits is None:
        raise ValueError("loss='lm' needs a model whose output has logits (a causal LM); this one "
                         "has none: use loss='distill' with the original model as teacher")
    labels = _labels(batch, ids)
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"loss='lm': logits {tuple(logits.shape)} do not match token ids "
                         f"{tuple(labels.shape)}; lm loss is for causal LMs over [batch, seq] tokens")
    if bare and int(labels.max()) >= logits.shape[-1]:  # hidden states, not scores over the vocabulary
        raise ValueError(f"loss='lm': the model's output {tuple(logits.shape)} has {logits.shape[-1]} values per "
                         f"position and the batch holds token id {int(labels.max())}: it is no logits over the "
                         "vocabulary; use loss='distill' with the original model as teacher")
    targets = labels[:, 1:]
    if not (targets != -100).any():
        raise NoTokenToPredict("loss='lm': the batch has no token to predict (all padding, or one token per row)")
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def reads_later_tokens(call, inputs: dict, ids: str) -> bool:
    """Whether `call`'s logits at some position move when the token after it changes: a
    bidirectional model (a masked LM), which lowers the next-token loss by copying the token it
    sees. Two forwards of `inputs` without gradients, the second with every row's last token
    changed; False where they cannot tell (no such ids, one position, no logits)."""
    x = inputs.get(ids)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] < 2 or x.is_floating_point():
        return False
    changed = x.clone()
    changed[:, -1] = torch.where(x[:, -1] > 0, x[:, -1] - 1, x[:, -1] + 1)  # another id, in the vocabulary
    with torch.no_grad():
        a, b = (_scores(call(**{**inputs, ids: t})) for t in (x, changed))
    if a is None or b is None or a.shape[:2] != x.shape:
        return False
    a, b = a[:, :-1].float(), b[:, :-1].float()
    # the margin of passes/causal.py's probe: kernels may sum masked-out zeros in another order
    return bool((a - b).abs().max() > 1e-5 * a.abs().max().clamp_min(1e-30))


def _labels(batch: dict, ids: str) -> torch.Tensor:
    """Token ids to predict (`labels`, else the ids), -100 where attention_mask is 0 (padding):
    `labels` copied from padded input_ids, the usual way to write them, scored the pads."""
    if "labels" not in batch and ids not in batch:
        raise ValueError(f"loss='lm' scores {ids} (or labels); the batch has {sorted(batch)}")
    key = "labels" if "labels" in batch else ids
    if not isinstance(batch[key], torch.Tensor):  # a list of ids died on `.to` with a bare AttributeError
        raise TypeError(f"loss='lm': the batch's {key} is a {type(batch[key]).__name__}; give a tensor of "
                        f"token ids (torch.tensor(...)) of shape [batch, seq]")
    # int64 whatever the ids are: cross_entropy takes no int32 targets, and the model takes int32 ids
    labels = batch[key].to(torch.long, copy=True)
    mask = _mask_for(batch.get("attention_mask"), labels.shape)
    if mask is not None:
        labels[mask == 0] = -100
    return labels


def _mask_for(mask, shape: torch.Size) -> torch.Tensor | None:
    """attention_mask as a [batch, seq] mask of `shape`: a [1, seq] mask beside [batch, seq] ids
    holds for every row, as the model reads it (the loss ignored it and scored the padding); None
    for no mask or one of another form (a 4-D mask of the model's own)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != len(shape):
        return None
    try:
        return mask.expand(shape)
    except RuntimeError:
        return None


def distill_loss(out, teacher, inputs: dict, flags: Mapping | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) per position over the logits, else the MSE of the first output
    tensor; averaged over the positions attention_mask keeps. `flags`: the non-tensor inputs the
    student was captured with, which a teacher module (its original) needs to compute the same
    thing; a plain function is the caller's own, called with the tensors alone (it may set them)."""
    with torch.no_grad():
        ref = teacher(**(flags or {}), **inputs) if isinstance(teacher, torch.nn.Module) else teacher(**inputs)
    student, target = _logits(out), _logits(ref)
    if student is not None and target is not None:
        log_s, log_t = F.log_softmax(student.float(), -1), F.log_softmax(target.float(), -1)
        per_position = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    else:
        student, target = _first_tensor(out), _first_tensor(ref)
        if student.shape != target.shape:
            raise ValueError(f"loss='distill': the student's output {tuple(student.shape)} and the "
                             f"teacher's {tuple(target.shape)} differ in shape")
        diff = student.float() - target.float()
        per_position = diff.pow(2).mean(-1) if diff.dim() > 1 else diff.pow(2)
    return _masked_mean(per_position, inputs.get("attention_mask"))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    mask = _mask_for(mask, values.shape)
    if mask is None:
        return values.mean()
    keep = mask != 0
    return values[keep].mean() if keep.any() else values.mean()


def _logits(out) -> torch.Tensor | None:
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        return out["logits"] if "logits" in out.keys() else None
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def _scores(out) -> torch.Tensor | None:
    """The logits, or a bare [batch, seq, n] output (a model of one's own returns them so)."""
    logits = _logits(out)
    return out if logits is None and isinstance(out, torch.Tensor) and out.dim() == 3 else logits


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    values = list(out.values()) if isinstance(out, Mapping) or hasattr(out, "keys") else (
        list(out) if isinstance(out, (tuple, list)) else [])
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"loss='distill' found no output tensor in a {type(out).__name__}")
