"""`heal method=lora … generate=N`: text the uncompressed model writes itself, to train the heal on.

The heal learns from what it is shown, and a compile's calibration text is short (3,072 tokens by
default): measured on SmolLM2-135M (benchmarks/README.md, collapse section), 100 steps on it alone
fit those tokens and lose on the eval text, while the model's own sampled continuations — as many as
asked for, on its own distribution — keep helping with more steps. Each continuation starts from the
first PROMPT real tokens of a calibration row (cycled), samples NEW tokens (fewer when the model
reads fewer positions; temperature 1, top-p 0.95, no top-k, end-of-text suppressed so every row is
whole, none of the model's own generation settings such as a repetition penalty), on the model's own
`generate` (KV cache): rows of PROMPT + NEW tokens, BATCH_SIZE to a batch as calibration batches
are. Seeded, so a policy heals the same way each time; the caller's random state (CPU and the
model's GPU) is left as it was.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ...calibration import BATCH_SIZE
from ...runtime.progress import Progress
from ...runtime.train import module_mode

__all__ = ["teacher_batches", "check_writer", "written_batch_count", "WriteError", "PROMPT", "NEW"]

PROMPT, NEW = 12, 128  # tokens of each row's opening, tokens written after it
_AT_ONCE = 32  # continuations sampled together


class WriteError(ValueError):
    """The model cannot write the text; `hint` says what the user can do."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


def check_writer(model: Any) -> None:
    """Raise WriteError unless `model` can write text: a model whose `generate` it can use."""
    generate = getattr(model, "generate", None)
    can = getattr(model, "can_generate", None)  # Hugging Face models all have generate; encoders cannot use it
    if not callable(generate) or (callable(can) and not can()):
        raise WriteError(f"{type(model).__name__} has no usable `generate` to write text with",
                         "an encoder writes no text: leave out generate=; a decoder: compile the Hugging Face "
                         "model itself, not a compiled one")
    if _new_tokens(model) < 1:
        raise WriteError(f"the model reads at most {_positions(model)} positions: no room after {PROMPT} tokens",
                         "leave out generate=")


def written_batch_count(model: Any, tokens: int) -> int:
    """How many batches teacher_batches(model, …, tokens) returns (known before writing any)."""
    rows = math.ceil(tokens / max(1, _new_tokens(model)))
    return math.ceil(rows / BATCH_SIZE)


def teacher_batches(model: Any, calib: list[dict], tokens: int, progress: Progress, seed: int = 0) -> list[dict]:
    """Batches of at least `tokens` new tokens written by `model` (a Hugging Face model with
    `generate`) after openings of the `calib` rows, on the device of the openings. Raises
    WriteError saying what is missing and what to do."""
    check_writer(model)
    prompts = _openings(calib)
    if not prompts:
        raise WriteError(f"no calibration row has the {PROMPT} real tokens a continuation starts from",
                         "pass longer calibration text (calib=[texts]), or leave out generate=")
    new = _new_tokens(model)
    count = math.ceil(tokens / new)
    device = prompts[0].device
    rows = []
    with torch.random.fork_rng(devices=_cuda_devices()), torch.no_grad(), module_mode(model, False), \
            _plain_generation(model) as pad, \
            progress.task(f"writing {count * new:,} tokens with the uncompressed model to heal on", total=count) as step:
        torch.manual_seed(seed)
        for start in range(0, count, _AT_ONCE):
            ids = torch.stack([prompts[i % len(prompts)] for i in range(start, min(start + _AT_ONCE, count))])
            try:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=1.0, top_p=0.95, top_k=0, min_new_tokens=new,
                                     max_new_tokens=new, pad_token_id=pad)
            except (RuntimeError, TypeError, ValueError) as e:  # the model's own code: say whose it was
                raise WriteError(f"{type(model).__name__}.generate failed: {e}", "leave out generate=") from e
            if out.shape != (len(ids), PROMPT + new):
                raise WriteError(f"`generate` returned {tuple(out.shape)} tokens for {len(ids)} rows of "
                                 f"{PROMPT} + {new}", "leave out generate=")
            rows += list(out)
            step(len(ids))
    return [{"input_ids": torch.stack(rows[i:i + BATCH_SIZE]),
             "attention_mask": torch.ones(len(rows[i:i + BATCH_SIZE]), PROMPT + new, dtype=torch.long, device=device)}
            for i in range(0, len(rows), BATCH_SIZE)]


def _new_tokens(model: Any) -> int:
    """Tokens written after each opening: NEW, fewer when the model reads fewer positions."""
    return min(NEW, _positions(model) - PROMPT)


@contextlib.contextmanager
def _plain_generation(model: Any):
    """The model's generation_config swapped, for the duration, for one that holds its special
    tokens only: Hugging Face fills every setting a call leaves unset from the model's own config,
    so a repetition penalty, n-gram bans or a min-p there would bend the text away from the model's
    distribution. Put back afterwards (compile never changes the user's model)."""
    from transformers import GenerationConfig  # only a heal that writes text needs it

    own = getattr(model, "generation_config", None)
    eos = getattr(own, "eos_token_id", None)
    pad = getattr(own, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, (list, tuple)) else eos)
    if own is not None:
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad,
                                                   bos_token_id=getattr(own, "bos_token_id", None))
    try:
        yield pad
    finally:
        if own is not None:
            model.generation_config = own


def _cuda_devices() -> list[int]:
    """Every GPU: torch.manual_seed seeds them all, so fork_rng must put back all of them."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


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
