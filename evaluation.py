"""Quality and cost metrics for the *output* side of the pipeline: original vs compiled model.

Every function takes any callable model used the way Hugging Face models are (keyword tensors in,
a ModelOutput / dict / tuple out), so a CompiledModel is measured exactly like its source model.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
import statistics
import sys
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .runtime.sizes import param_bytes

__all__ = [
    "default_text", "eval_text", "context_length", "calibration_texts", "perplexity", "embed", "embedding_cosine", "param_bytes", "latency_ms",
    "paired_latency_ms",
    "NotScorable",
]


_MOVED = ("eval_rows", "eval_table", "eval_paragraphs", "EVAL_SENTENCES")  # to eval_table.py


def __getattr__(name: str):
    """`slimfx eval`'s table moved to eval_table.py; `from slimfx.evaluation import eval_rows`
    still works (lazily: eval_table imports this module)."""
    if name in _MOVED:
        from . import eval_table

        return getattr(eval_table, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class NotScorable(ValueError):
    """The model cannot be scored as asked (a decoder compiled with `restore=false` returns fewer
    positions than it was given): a refusal with what to do, not a bug."""

# Mostly prose docstrings that have stayed put across CPython releases; order is fixed so the
# text (and every perplexity computed on it) is the same run to run on one Python version.
_DOC_SOURCES = (
    "heapq:__about__", "argparse", "subprocess", "doctest", "unittest", "sched", "pydoc",
    "difflib", "difflib:SequenceMatcher", "random", "inspect", "typing", "string",
    "textwrap:TextWrapper", "contextlib:contextmanager", "statistics",
)


def default_text() -> str:
    """English text from standard-library docstrings (~7k SmolLM2 tokens: eval_text() ~3.9k, then calibration).

    Needs no download. Raises RuntimeError under `python -OO`, which strips docstrings.
    """
    parts = [_clean(_docstring(src)) for src in _DOC_SOURCES]
    text = "\n\n".join(p for p in parts if p)
    if len(text) < 2000:
        raise RuntimeError("standard-library docstrings are missing (python -OO?); pass your own "
                           "text to perplexity() instead of default_text().")
    return text


# default_text() splits in two at a paragraph boundary: `slimfx eval` scores the first part,
# default calibration reads the second, so a compiled model is never scored on text it was
# calibrated on, whatever --max-tokens says.
EVAL_SHARE = 0.55


def eval_text() -> str:
    """The part of default_text() that `slimfx eval` scores (its first ~55%)."""
    return "\n\n".join(_split_default()[0])


def calibration_texts(min_words: int = 20) -> list[str]:
    """Paragraphs of default_text() after eval_text(), for default calibration."""
    return [p for p in _split_default()[1] if len(p.split()) > min_words]


@functools.cache  # default_text() walks many docstrings; eval and calibration both ask for it
def _split_default() -> tuple[tuple[str, ...], tuple[str, ...]]:
    paragraphs = tuple(default_text().split("\n\n"))
    total, seen = sum(len(p) for p in paragraphs), 0
    for i, p in enumerate(paragraphs):
        seen += len(p)
        if seen >= EVAL_SHARE * total:
            return paragraphs[:i + 1], paragraphs[i + 1:]
    return paragraphs, ()


def _docstring(source: str) -> str:
    module, _, attr = source.partition(":")
    obj: Any = importlib.import_module(module)
    if attr == "__about__":
        return getattr(obj, attr, "") or ""
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return inspect.getdoc(obj) or ""


def _clean(doc: str) -> str:
    """Tabs to spaces, no trailing blanks or form feeds, at most one empty line in a row."""
    doc = inspect.cleandoc(doc).expandtabs(4).replace("\f", "")
    lines = [line.rstrip() for line in doc.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ---------------------------------------------------------------- model outputs

def _field(out: Any, name: str) -> torch.Tensor:
    """`name` from a ModelOutput / dict, else the first element of a tuple, else `out` itself."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        if name in out.keys():
            return out[name]
    elif hasattr(out, name):
        return getattr(out, name)
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"cannot find {name!r} in a model output of type {type(out).__name__}; "
                    f"return a ModelOutput, a dict with {name!r}, or a tuple with it first.")


def accepted_inputs(model: Callable, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tokenizer outputs the model's forward does not take (e.g. token_type_ids), or that a
    compiled model's graph was not captured with (an artifact compiled from bare input_ids)."""
    names = getattr(model, "input_names", None)
    if names is not None:
        out = {k: v for k, v in inputs.items() if k in names}
        # and the flags it was captured with away from what leaving them out means, which a call
        # may not leave out (output_hidden_states=True in the example): perplexity() was refused
        call = getattr(getattr(model, "graph", None), "call", None)
        flags = dict(getattr(call, "flags", ()))
        return {**out, **{n: flags[n] for n, _ in getattr(call, "declared", ()) if n in flags}}
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(inputs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(inputs)
    return {k: v for k, v in inputs.items() if k in params}


# ---------------------------------------------------------------- causal LMs

def perplexity(model: Callable, tokenizer: Any, text: str, *, window: int | None = None,
               max_tokens: int = 2048, progress: bool = False) -> float:
    """exp(token-weighted mean NLL) over non-overlapping `window`-token chunks of `text`.

    Only the first `max_tokens` tokens are scored; each chunk predicts its tokens 2..n from
    the ones before, so no token is scored twice and no context crosses a chunk border. A model
    that returns fewer positions than it is given (`tokens after … restore=false`) is refused.
    `window` defaults to default_window(model).
    """
    longest = context_length(model)
    if window is None:
        window = default_window(model)
    elif longest is not None and window > longest:  # the embedding lookup failed with an IndexError
        raise ValueError(f"window={window} is longer than the {longest} positions {type(model).__name__} "
                         f"takes (its config); pass window={longest} or less")
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if max_tokens < 2:  # a negative one sliced tokens off the end, silently
        raise ValueError(f"max_tokens must be at least 2 tokens, got {max_tokens}")
    ids = torch.as_tensor(tokenizer(text, return_tensors="pt")["input_ids"]).reshape(-1)
    ids = ids[:max_tokens]
    chunks = scored_chunks(ids, window)
    if not chunks:
        raise ValueError(f"text is {ids.numel()} token(s) long; perplexity needs at least 2.")
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for i, chunk in enumerate(chunks):
            nll, count = _chunk_nll(model, chunk)
            total_nll, total_tokens = total_nll + nll, total_tokens + count
            if progress:
                print(f"perplexity: chunk {i + 1}/{len(chunks)} "
                      f"running ppl {_exp(total_nll / total_tokens):.3f}", file=sys.stderr)
    return _exp(total_nll / total_tokens)


def _exp(nll: float) -> float:
    """exp(mean NLL), inf past float's range (a mean NLL over 709 raised OverflowError)."""
    return math.inf if nll > 709.78 else math.exp(nll)  # NaN stays NaN


def scored_chunks(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """`window`-token chunks of the 1-D `ids`; a last chunk of one token predicts nothing: left out."""
    return [c for c in ids.split(window) if c.numel() >= 2]


def default_window(model) -> int:
    """perplexity()'s window: 256 tokens, or the model's context where its config says less."""
    return min(256, context_length(model) or 256)


def _chunk_nll(model: Callable, chunk: torch.Tensor) -> tuple[float, int]:
    device = _device_of(model)
    input_ids = chunk.unsqueeze(0).to(device)
    mask = torch.ones_like(input_ids)
    logits = _field(model(**accepted_inputs(model, {"input_ids": input_ids, "attention_mask": mask})), "logits")
    if logits.shape[1] != input_ids.shape[1]:
        # `tokens after … prune` with restore=false returns the kept positions only: the dropped ones
        # have no next-token prediction, and scoring the kept ones alone would compare positions the
        # model chose against the original's every position.
        raise NotScorable(
            f"the model returned logits for {logits.shape[1]} of the {input_ids.shape[1]} positions it was "
            "given (a token rule with restore=false keeps only the remaining tokens), so perplexity over "
            "the text is not defined; compile the same policy with restore=true on its `tokens after` "
            "rules to score it, and keep restore=false for generation")
    # Position t predicts token t+1; sum in float32 even if the model ran in lower precision.
    pred = logits[0, :-1].float()
    nll = F.cross_entropy(pred, input_ids[0, 1:], reduction="sum")
    return float(nll), int(input_ids.shape[1] - 1)


def _device_of(model: Callable) -> torch.device:
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------- encoders

def embed(model: Callable, tokenizer: Any, texts: Iterable[str], *, max_length: int | None = None) -> torch.Tensor:
    """Attention-mask-weighted mean of the last hidden states (of the per-token logits where it
    returns none, a masked LM's; a classifier's logits): one row per text, float32; texts
    cut at `max_length` tokens (default: the tokenizer's own limit). A model compiled with
    `tokens after … restore=false` returns only its remaining tokens [B, L′, D]: those are weighted
    by how many input tokens each holds (its `kept_tokens` "sizes"): after merging, the mean pooling
    of the restore=true output; after pruning, the mean of the tokens kept."""
    texts = list(texts)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = _device_of(model)
    inputs = {k: v.to(device) for k, v in accepted_inputs(model, dict(enc)).items()}
    if len(texts) > 1 and "attention_mask" in enc and "attention_mask" not in inputs \
            and not bool(enc["attention_mask"].all()):
        # A model (an artifact) captured without a mask would read the pads as tokens: cosine 0.82
        # for the empty policy on MiniLM. Each text alone has no pads.
        return torch.cat([embed(model, tokenizer, [t], max_length=max_length) for t in texts])
    earlier = getattr(model, "kept_tokens", None)
    with torch.inference_mode():
        out = model(**inputs)
    logits = _per_text_logits(out)
    if logits is not None:  # a classifier returns no hidden states: its logits are its per-text output
        return logits.float()
    hidden = _per_token_output(out).float()
    weights = _kept_sizes(model, earlier)
    if weights is None:
        weights = enc["attention_mask"]
    weights = weights.to(hidden.device, hidden.dtype).unsqueeze(-1)
    if weights.shape[1] != hidden.shape[1]:
        raise ValueError(f"the model returned {hidden.shape[1]} tokens for inputs of {weights.shape[1]} "
                         "and did not say which (a CompiledModel's kept_tokens)")
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _per_token_output(out: Any) -> torch.Tensor:
    """The last hidden states, or where the output has none, its per-token logits [B, S, V] (a
    folder of BertForMaskedLM or …ForTokenClassification: eval raised a TypeError)."""
    keys = out.keys() if isinstance(out, dict) or hasattr(out, "keys") else ()
    if "last_hidden_state" not in keys and "logits" in keys and getattr(out["logits"], "dim", lambda: 0)() == 3:
        return out["logits"]
    return _field(out, "last_hidden_state")


def _per_text_logits(out: Any) -> torch.Tensor | None:
    """A sequence or image classifier's [texts, classes] logits, when the output has no hidden
    states (a folder of BertForSequenceClassification: embed raised a TypeError)."""
    keys = out.keys() if isinstance(out, dict) or hasattr(out, "keys") else ()
    if "last_hidden_state" in keys or "logits" not in keys:
        return None
    logits = out["logits"]
    return logits if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None


def _kept_sizes(model: Callable, earlier: Any) -> torch.Tensor | None:
    """The input tokens each output slot holds, when the call just made returned the shorter
    sequences of `restore=false` (CompiledModel.kept_tokens, a new dict per call; `earlier` is the
    one from before the call, so a stale one from another batch is never used)."""
    kept = getattr(model, "kept_tokens", None)
    return kept["sizes"] if kept is not None and kept is not earlier else None


def embedding_cosine(model_a: Callable, model_b: Callable, tokenizer: Any,
                     texts: Iterable[str], *, max_length: int | None = None) -> float:
    """Mean over texts of cos(embed_a(text), embed_b(text)); 1.0 means same embeddings."""
    texts = list(texts)
    if not texts:
        raise ValueError("embedding_cosine needs at least one text")
    a, b = embed(model_a, tokenizer, texts, max_length=max_length), embed(model_b, tokenizer, texts, max_length=max_length)
    return float(F.cosine_similarity(a.double(), b.double().to(a.device), dim=-1).mean())


VISION_IMAGES = 16  # seeded random images: no image set ships with slimfx


def vision_images(example: dict[str, torch.Tensor], count: int = VISION_IMAGES, seed: int = 0) -> torch.Tensor:
    """`count` images of the example's channels and size, drawn from a private generator (the
    same every run): what `slimfx eval` compares a vision model's logits on."""
    pixels = example["pixel_values"]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, *pixels.shape[1:], generator=gen).to(pixels.dtype)


@torch.inference_mode()
def logit_cosine(model_a: Callable, model_b: Callable, pixel_values: torch.Tensor) -> float:
    """Mean over images of cos(logits_a, logits_b) (the classifier's, or the last hidden state's
    flattened per image where the model has no head); 1.0 means the same outputs."""
    def flat(model):
        out = model(pixel_values=pixel_values.to(_device_of(model)))
        logits = _per_text_logits(out)
        return (logits if logits is not None else _field(out, "last_hidden_state")).flatten(1).double()

    a, b = flat(model_a), flat(model_b)
    return float(F.cosine_similarity(a, b.to(a.device), dim=-1).mean())


# ---------------------------------------------------------------- cost

def latency_ms(model: Callable, inputs: Any, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one call in milliseconds, under torch.inference_mode.

    `inputs` is a dict (keyword call), a tuple/list (positional) or a single tensor.
    """
    return paired_latency_ms([(model, inputs)], repeats=repeats, warmup=warmup)[0]


def paired_latency_ms(calls: list[tuple[Callable, Any]], *, repeats: int = 20, warmup: int = 3) -> list[float]:
    """latency_ms of each (model, inputs), the models taking turns call by call. Timed one after
    the other, a load that came or went between them (another process on a shared machine) moved
    one model's time and not the other's: `slimfx eval` once gave ×0.17 for models ×0.56 apart."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    timed = [(_caller(model, inputs), _synchronizer(inputs)) for model, inputs in calls]
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for (call, sync), own in zip(timed, times):
                start = time.perf_counter()
                call()
                sync()
                if i >= warmup:
                    own.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def _caller(model: Callable, inputs: Any) -> Callable[[], Any]:
    if isinstance(inputs, dict):
        return lambda: model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return lambda: model(*inputs)
    return lambda: model(inputs)


def _synchronizer(inputs: Any) -> Callable[[], None]:
    """CUDA calls return before the kernel ends; wait for it so the time is the real one."""
    values = inputs.values() if isinstance(inputs, dict) else (
        inputs if isinstance(inputs, (tuple, list)) else [inputs])
    if any(isinstance(v, torch.Tensor) and v.is_cuda for v in values):
        return torch.cuda.synchronize
    return lambda: None


def context_length(model: Any) -> int | None:
    """The most tokens one sequence of `model` may hold, as its config says (None when it says
    nothing): `slimfx eval` cuts its windows and texts there — a tiny GPT-2 of 128 positions
    raised an index error at the default 256. A CompiledModel says what its original's config
    said (perplexity() gave it another default window than the original's)."""
    from .runtime.program import config_positions

    config = getattr(model, "config", None)
    if config is not None:
        return config_positions(config)
    return getattr(getattr(getattr(model, "graph", None), "call", None), "positions", None)