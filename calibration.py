"""Calibration data as a user passes it, turned into the batches the passes run: `compile(...,
calib=...)` and `slimfx compile --calib FILE` both come through here.

Accepted forms: None (default text, for a slimfx.models model with a tokenizer), a tensor of
token ids ([batch, seq] or [seq]), a dict of tensors (one batch), a list of tensors or dicts
(one batch each), a list of texts (with a slimfx.models model, which knows its tokenizer), or
the path of a text file (paragraphs, separated by blank lines, become the texts), or a number
of tokens N (an int, with a slimfx.models model): N tokens of built-in text, the default's 3,072
first and then more_text.py's (standard-library docstrings and the Language Reference's
topics, ≈226k SmolLM2 tokens in all) — more rows for what fits on calibration, such as
`heal method=linear`, without a file. Texts become rows of at most 128 tokens: a longer one goes
on in further rows, so none of it is dropped.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["calibration_batches", "read_paragraphs", "builtin_token_count", "BATCH_SIZE", "MAX_TOKENS"]

BATCH_SIZE, MAX_TOKENS = 4, 128  # texts per batch, tokens per text
ACCEPTED = ("a tensor of token ids ([batch, seq] or [seq]), a dict of tensors (one batch), "
            "a list of such tensors or dicts, a list of texts (with a model from slimfx.models.load), "
            "the path of a text file, or a number of tokens of built-in text (an int)")


def calibration_batches(model, calib, *, ids: str = "input_ids", vocab: int | None = None,
                        masked: bool = True) -> list[dict[str, Any]]:
    """The batches `calib` stands for (see the module docstring); [] when there are none. `ids`:
    the input a bare tensor of token ids is (compile passes the model's own name for it). Token
    ids outside the model's vocabulary (`vocab` rows, else its config's), and batches of no
    tokens, are refused by batch. `masked=False`: the model takes no attention mask, so rows of
    text are batched only with rows of their own length — padding it cannot tell from text
    changed the real tokens' activations (an encoder attends to it)."""
    batches = _forms(model, calib, ids, masked)
    _check_ids(model, batches, ids, vocab)
    return batches


def _forms(model, calib, ids: str, masked: bool) -> list[dict[str, Any]]:
    if calib is None:
        return _default(model, masked)
    if isinstance(calib, int) and not isinstance(calib, bool):
        return _builtin(model, calib, masked)
    if isinstance(calib, (str, os.PathLike)):  # one string is a file name; texts come as a list
        return _texts(model, read_paragraphs(calib, hint=TEXTS_HINT), masked=masked)
    if isinstance(calib, torch.Tensor):
        return [_ids_batch(calib, ids)]
    if isinstance(calib, Mapping):
        return [_dict_batch(calib, 0)]
    if isinstance(calib, (list, tuple)):
        if calib and all(isinstance(c, str) for c in calib):
            return _texts(model, list(calib), masked=masked)
        return [_one(c, i, ids) for i, c in enumerate(calib)]
    raise TypeError(f"calib must be {ACCEPTED}; got {type(calib).__name__}")


# compile(calib="some text") reads a file of that name: what to do when none is there. Not for the
# command line's --calib FILE, which has no list to pass.
TEXTS_HINT = " (one string is read as a file path; pass texts as a list of strings)"


def read_paragraphs(path: str | os.PathLike, what: str = "calibration text", hint: str = "") -> list[str]:
    """Paragraphs of a UTF-8 text file (blank-line separated, whitespace runs made one space),
    empty ones dropped; `what` names the file in errors (benchmarks read eval texts with it),
    `hint` follows a file that cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # an editor's byte-order mark is no text
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e}{hint}") from e
    # a line of only spaces separates paragraphs too (it looks blank)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n[ \t\r\f\v]*\n", text)]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise ValueError(f"{what} {str(path)!r} is empty")
    return paragraphs


def _one(item, i: int, ids: str) -> dict[str, Any]:
    if isinstance(item, torch.Tensor):
        return _ids_batch(item, ids)
    if isinstance(item, Mapping):
        return _dict_batch(item, i)
    raise TypeError(f"calib[{i}] is a {type(item).__name__}; a list of calibration batches holds "
                    f"tensors of token ids or dicts of tensors (calib may be {ACCEPTED})")


def _ids_batch(ids: torch.Tensor, name: str) -> dict[str, Any]:
    # bool (a mask passed in their place) and complex are no ids either: all-True compiled as id 1
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() not in (1, 2):
        raise TypeError(f"a calibration tensor is token ids, [batch, seq] or [seq] integers; got "
                        f"{ids.dtype} {tuple(ids.shape)} (pass a dict to name other inputs)")
    return {name: ids.reshape(1, -1) if ids.dim() == 1 else ids}


def _dict_batch(batch: Mapping, i: int) -> dict[str, Any]:
    wrong = [k for k, v in batch.items() if not isinstance(v, torch.Tensor)]
    if wrong:
        raise TypeError(f"calibration batch {i}: {wrong} are not tensors; a batch maps input names to tensors")
    return dict(batch)


def _texts(model, texts: list[str], max_tokens: int | None = None, masked: bool = True) -> list[dict[str, Any]]:
    """Rows of at most MAX_TOKENS tokens — a longer text goes on in further rows, none of it
    dropped — BATCH_SIZE rows to a batch (the last may hold fewer), each batch only as wide as
    its longest row; with `max_tokens`, rows up to the one that reaches that many real tokens."""
    encode = _encoder(model, "texts")
    if not texts:
        return []
    if not any(t.strip() for t in texts):  # the tokenizer makes no row of them; torch would say less
        raise ValueError(f"calib holds {len(texts)} text(s), all empty or whitespace: give texts to calibrate on")
    texts = [t for t in texts if t.strip()]  # an empty one has no token to lose
    return _batches(encode(texts, max_length=MAX_TOKENS, overflow=True), max_tokens, masked)


def _batches(rows: dict[str, Any], max_tokens: int | None, masked: bool = True) -> list[dict[str, Any]]:
    """_texts' batches of rows already encoded; unmasked, each of rows of one length (in the
    order each length first comes)."""
    total = len(rows["input_ids"])
    if max_tokens is not None and "attention_mask" in rows:
        lengths = rows["attention_mask"].sum(1)
        total = int((lengths.cumsum(0) - lengths < max_tokens).sum())  # rows starting before the cap
    if masked or "attention_mask" not in rows:
        groups = [list(range(total))]
    else:
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(rows["attention_mask"][:total].sum(1).tolist()):
            by_length.setdefault(n, []).append(i)
        groups = list(by_length.values())
    batches = []
    for i, rows_of in ((i, group) for group in groups for i in range(0, len(group), BATCH_SIZE)):
        index = torch.tensor(rows_of[i:i + BATCH_SIZE])
        batch = {k: v[index] for k, v in rows.items()}
        if "attention_mask" in batch:  # padding columns no row of this batch uses (either side)
            used = batch["attention_mask"].bool().any(0)
            batch = {k: v[:, used] if v.dim() == 2 and v.shape[1] == used.numel() else v for k, v in batch.items()}
        batches.append(batch)
    return batches


# The default calibration: rows of the calibration text up to DEFAULT_TOKENS real tokens (24 rows
# of 128; SmolLM2's tokens of it all are 3,143). Paragraphs of 20+ words used to be one row
# each, cut at 128 tokens (1,742 of SmolLM2's tokens). With these 3,072, benchmarks/collapse.py's
# `heal method=linear` went from ×1.316 to ×1.278 of fp32 (4 blocks dropped) and from ×2.044 to
# ×1.871 (8 blocks), and `make demo` from ×1.215 to ×1.164. The cap keeps byte-level tiny models
# (a token per character, 9k of them) at the size they had (3,061).
DEFAULT_TOKENS = 3072


def _default(model, masked: bool = True) -> list[dict[str, Any]]:
    """Paragraphs of the default text that `slimfx eval` never scores; none without a tokenizer
    (a pass that needs calibration, GPTQ or the budget solver, then says so)."""
    if getattr(model, "tokenizer", None) is None or not hasattr(model, "encode"):
        return []
    # One text of every paragraph (headings and short lines too), cut into rows of MAX_TOKENS:
    # no row is mostly padding, and each still has the tokenizer's special tokens.
    return _texts(model, [own_text()], max_tokens=DEFAULT_TOKENS, masked=masked)


class CalibrationSize(ValueError):
    """calib=N asks for fewer tokens than one row or more than the built-in text has."""

    def __init__(self, asked: int, available: int):
        self.asked, self.available, self.least = asked, available, MAX_TOKENS
        super().__init__(f"calib={asked}: the built-in text has {available:,} tokens for this tokenizer; ask "
                         f"for {MAX_TOKENS} to {available} (for more, pass your own text: a list of texts or a file)")


def _builtin(model, tokens: int, masked: bool = True) -> list[dict[str, Any]]:
    """Rows of the default calibration text and then more_text.py's, up to `tokens` real tokens;
    `tokens` = DEFAULT_TOKENS gives exactly the default's rows."""
    _encoder(model, "a number of tokens")
    rows = _builtin_rows(model)  # once: ~226k tokens of SmolLM2's
    available = _token_count(rows)
    if not MAX_TOKENS <= tokens <= available:
        raise CalibrationSize(tokens, available)
    return _batches(rows, max_tokens=tokens, masked=masked)


def _check_ids(model, batches: list[dict[str, Any]], name: str, vocab: int | None = None) -> None:
    """`vocab`: the rows of the table the ids index (a compiled or hand-written model has no
    config: ids past it died in the embedding with a bare IndexError); else the config's."""
    if vocab is None:
        config = getattr(getattr(model, "model", model), "config", None)
        vocab = getattr(config, "vocab_size", None)
    for i, batch in enumerate(batches):
        ids = batch.get(name)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            continue
        if ids.numel() == 0:
            raise ValueError(f"calib batch {i} has {name} of shape {tuple(ids.shape)}: no tokens to run")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (isinstance(vocab, int) and high >= vocab):
            bad = low if low < 0 else high
            raise ValueError(f"calib batch {i} holds token id {bad}, outside the model's vocabulary "
                             f"(0..{vocab - 1 if isinstance(vocab, int) else '…'}): were these ids made by another "
                             "model's tokenizer?")
    masks = [b.get("attention_mask") for b in batches]
    if masks and all(isinstance(m, torch.Tensor) and not bool(m.bool().any()) for m in masks):
        # every token is padding: the statistics would be empty ("no calibration rows were added")
        raise ValueError("every calib batch's attention_mask is all 0: no real token to calibrate on; "
                         "a mask is 1 at real tokens")


def _encoder(model, what: str):
    """`model.encode`, for calib forms that are text; a model without a tokenizer is told what to pass."""
    encode = getattr(model, "encode", None)
    if encode is None or getattr(model, "tokenizer", None) is None:
        raise TypeError(f"calib as {what} needs a model from slimfx.models.load(...) with a tokenizer; "
                        "otherwise pass token ids: a tensor, or a list of dicts of the model's inputs")
    return encode


def builtin_token_count(model) -> int:
    """How many tokens of built-in calibration text `model`'s tokenizer makes (calib=N's limit)."""
    return _token_count(_builtin_rows(model))


def _builtin_rows(model) -> dict[str, Any]:
    return model.encode([builtin_text()], max_length=MAX_TOKENS, overflow=True)


def _token_count(rows: dict[str, Any]) -> int:
    return int(rows["attention_mask"].sum()) if "attention_mask" in rows else rows["input_ids"].numel()


def own_text() -> str:
    """Every paragraph of the calibration part of the built-in text, as one text (headings and
    short lines too): the default calibration reads it, and `slimfx train` first."""
    from .evaluation import calibration_texts

    return "\n\n".join(calibration_texts(min_words=0))


def builtin_text() -> str:
    """own_text(), then more_text.py's docstrings: calib=N's text, and `slimfx train`'s past the first."""
    from .more_text import more_texts

    # One text, so rows are full and the first DEFAULT_TOKENS are the default's rows exactly.
    return "\n\n".join([own_text(), *more_texts()])
