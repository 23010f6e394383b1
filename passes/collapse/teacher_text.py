"""`heal method=lora … generate=N`: text the uncompressed model writes itself, to train the heal on.

The heal learns from what it is shown, and a compile's calibration text is short (3,072 tokens by
default): measured on SmolLM2-135M (README, collapse section), 100 steps on it alone fit those
tokens and lose on the eval text, while the model's own sampled continuations — as many as asked
for, on its own distribution — keep helping with more steps. Each continuation starts from the
first PROMPT real tokens of a calibration row (cycled), samples NEW tokens (fewer when the model
reads fewer positions; temperature 1, top-p 0.95, end-of-text suppressed so every row is whole), on the model's own `generate` (KV cache):
rows of PROMPT + NEW tokens, BATCH_SIZE to a batch as calibration batches are. Seeded, so a
policy heals the same way each time; the caller's random state is left as it was.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ...calibration import BATCH_SIZE
from ...runtime.progress import Progress
from ...runtime.train import module_mode

__all__ = ["teacher_batches", "PROMPT", "NEW"]

PROMPT, NEW = 12, 128  # tokens of each row's opening, tokens written after it
_AT_ONCE = 32  # continuations sampled together


def teacher_batches(model: Any, calib: list[dict], tokens: int, progress: Progress, seed: int = 0) -> list[dict]:
    """Batches of at least `tokens` new tokens written by `model` (a Hugging Face model with
    `generate`) after openings of the `calib` rows. Raises ValueError saying what is missing."""
    generate = getattr(model, "generate", None)
    can = getattr(model, "can_generate", None)  # Hugging Face models all have generate; encoders cannot use it
    if not callable(generate) or (callable(can) and not can()):
        raise ValueError(f"{type(model).__name__} has no `generate` to write text with (an encoder writes none)")
    prompts = _openings(calib)
    if not prompts:
        raise ValueError(f"no calibration row has the {PROMPT} real tokens a continuation starts from")
    new = min(NEW, _positions(model) - PROMPT)
    if new < 1:
        raise ValueError(f"the model reads at most {_positions(model)} positions: no room after {PROMPT} tokens")
    count = math.ceil(tokens / new)
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, (list, tuple)) else eos)
    rows = []
    with torch.random.fork_rng(devices=[]), torch.no_grad(), module_mode(model, False), \
            progress.task(f"writing {count * new:,} tokens with the uncompressed model to heal on", total=count) as step:
        torch.manual_seed(seed)
        for start in range(0, count, _AT_ONCE):
            ids = torch.stack([prompts[i % len(prompts)] for i in range(start, min(start + _AT_ONCE, count))])
            out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                           top_p=0.95, top_k=0, min_new_tokens=new, max_new_tokens=new, pad_token_id=pad)
            if out.shape != (len(ids), PROMPT + new):
                raise ValueError(f"`generate` returned {tuple(out.shape)} tokens for {len(ids)} rows of "
                                 f"{PROMPT} + {new}")
            rows += list(out)
            step(len(ids))
    return [{"input_ids": torch.stack(rows[i:i + BATCH_SIZE]),
             "attention_mask": torch.ones(len(rows[i:i + BATCH_SIZE]), PROMPT + new, dtype=torch.long)}
            for i in range(0, len(rows), BATCH_SIZE)]


def _positions(model: Any) -> int:
    """The longest row the model reads (its config's max_position_embeddings; unbounded without)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else PROMPT + NEW


def _openings(calib: list[dict]) -> list[torch.Tensor]:
    """The first PROMPT real tokens of each calibration row that has that many."""
    out = []
    for batch in calib:
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            continue
        mask = batch.get("attention_mask")
        for i, row in enumerate(ids):
            real = row[mask[i].bool()] if isinstance(mask, torch.Tensor) else row
            if len(real) >= PROMPT:
                out.append(real[:PROMPT].clone())
    return out
