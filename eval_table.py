"""`slimfx eval`'s table: one row per model (original, then compiled) with its quality metric
(perplexity, embedding cosine or logit cosine, as the model's kind asks), weight bytes and CPU
latency, the compiled/original ratios, and a caption saying what each column measured."""
from __future__ import annotations

from typing import Any

import torch

from .evaluation import (VISION_IMAGES, accepted_inputs, context_length, default_window, embedding_cosine, eval_text,
                         logit_cosine, paired_latency_ms, param_bytes, perplexity, scored_chunks, vision_images)

__all__ = ["EVAL_SENTENCES", "eval_paragraphs", "eval_rows", "eval_table"]

LATENCY_CALLS = 10  # timed calls of each model (after 2 untimed)

EVAL_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A compiler rewrites programs into faster programs that mean the same thing.",
    "Weights stored in four bits take an eighth of the memory of thirty-two-bit floats.",
    "The weather in the mountains changed quickly in the afternoon.",
)


def eval_paragraphs(count: int = 16, min_words: int = 40) -> list[str]:
    """The first `count` paragraphs of eval_text() with at least `min_words` words: a padded batch
    of real paragraphs of uneven length, as sentence-embedding services see them."""
    return [p for p in eval_text().split("\n\n") if len(p.split()) >= min_words][:count]


def eval_rows(loaded, compiled=None, *, max_tokens: int = 2048) -> list[dict[str, Any]]:
    """One row per model (original, then compiled): quality metric, stored weight bytes, bytes
    held while running (a compiled model's CPU kernels keep converted copies of packed weights),
    latency. Causal LMs get perplexity on eval_text() and latency on the example inputs; encoders
    get the mean embedding cosine to the original model on EVAL_SENTENCES and eval_paragraphs()
    (1.0 for the original itself) and latency on the padded batch of eval_paragraphs(); vision
    models the mean logit cosine to the original on vision_images() and latency on their example.
    """
    return _eval_rows(loaded, compiled, max_tokens)[0]


def _eval_rows(loaded, compiled, max_tokens: int) -> tuple[list[dict[str, Any]], str]:
    """eval_rows() and a line on what each column measured."""
    models = [("original", loaded.model)] + ([("compiled", compiled)] if compiled is not None else [])
    timed = loaded.example_inputs
    texts = (*EVAL_SENTENCES, *eval_paragraphs())
    longest = context_length(loaded.model)
    if loaded.kind == "encoder" and loaded.tokenizer is not None:
        batch = loaded.tokenizer(eval_paragraphs(), padding=True, truncation=True, max_length=longest,
                                 return_tensors="pt")
        timed = accepted_inputs(loaded.model, dict(batch))
    rows = []
    # The compiled model first: a decoder that cannot be scored (`restore=false`) is refused before
    # the original's perplexity is paid for. The table still lists the original first.
    for label, model in reversed(models):
        stored = model.weight_bytes() if hasattr(model, "weight_bytes") else param_bytes(model)
        row = {"model": label, "bytes": stored, "running_bytes": param_bytes(model)}
        if loaded.kind == "causal-lm" and loaded.tokenizer is not None:  # no tokenizer: no text to score
            row["perplexity"] = perplexity(model, loaded.tokenizer, eval_text(), max_tokens=max_tokens,
                                           window=default_window(loaded.model))
        elif loaded.tokenizer is not None:
            row["cosine"] = embedding_cosine(loaded.model, model, loaded.tokenizer, texts, max_length=longest)
        elif loaded.kind == "vision":
            row["logit cosine"] = logit_cosine(loaded.model, model, vision_images(loaded.example_inputs))
        rows.insert(0, row)
    # the models take turns, call by call: timed apart, a load that came between them moved one
    calls = [(model, accepted_inputs(model, timed) if isinstance(timed, dict) else timed) for _, model in models]
    for row, ms in zip(rows, paired_latency_ms(calls, repeats=LATENCY_CALLS, warmup=2)):
        row["latency_ms"] = ms
    return rows, _measured(loaded, timed, max_tokens, default_window(loaded.model), len(models) > 1)


def _measured(loaded, timed, max_tokens: int, window: int, in_turn: bool = False) -> str:
    """What the table's columns measured: the demo's table gave a latency and a perplexity with
    no word of the input or the tokens they came from. The tokens as perplexity() reads them (the
    first max_tokens of the text, at most)."""
    shapes = [tuple(v.shape) for v in (timed.values() if isinstance(timed, dict) else [timed])
              if isinstance(v, torch.Tensor)]
    on = f"on an input of {'×'.join(map(str, shapes[0]))}" if shapes else "on the example inputs"
    latency = f"CPU latency: median of {LATENCY_CALLS} calls {on}" + (", the models in turn" if in_turn else "")
    if loaded.tokenizer is None:
        return latency
    if loaded.kind == "causal-lm":
        ids = torch.as_tensor(loaded.tokenizer(eval_text(), return_tensors="pt")["input_ids"]).reshape(-1)
        tokens = sum(c.numel() for c in scored_chunks(ids[:max_tokens], window))  # as perplexity() reads them
        return (f"perplexity: the first {tokens:,} tokens of the built-in eval text, in windows of "
                f"{min(window, tokens)}; " + latency)
    return (f"cosine: mean over {len(EVAL_SENTENCES)} sentences and {len(eval_paragraphs())} paragraphs of the "
            f"built-in eval text; {latency}")


def eval_table(loaded, compiled=None, *, max_tokens: int = 2048):
    """eval_rows() as a rich Table, with ratios of the compiled model to the original."""
    from rich.markup import escape
    from rich.table import Table

    rows, measured = _eval_rows(loaded, compiled, max_tokens)
    metric = next((m for m in ("perplexity", "cosine", "logit cosine") if m in rows[0]), None)
    # No quality column is said, not left out silently: a model without a tokenizer has no text to score.
    caption = measured if metric else \
        f"no {'perplexity' if loaded.kind == 'causal-lm' else 'embedding cosine'}: {loaded.name} has no tokenizer; {measured}"
    if metric == "logit cosine":
        caption = (f"logit cosine to the original on {VISION_IMAGES} seeded random images (no image set ships with "
                   f"slimfx); {measured}")
    # rich reads `[…]` as markup: a model folder `runs/[v2]` showed as `runs/`
    table = Table(title=escape(f"slimfx eval: {loaded.name} ({loaded.kind})"), caption=escape(caption))
    for col in ("model", *([metric] if metric else []), "weight bytes", "bytes while running", "CPU latency (ms)"):
        table.add_column(col, justify="right")
    # a cosine near 1 to six places: 0.99998 and 0.99995 both showed as 1.0000 (×1.000)
    places = 6 if metric and "cosine" in metric else 4
    for row in rows:
        cells = [escape(row["model"]), *([f"{row[metric]:.{places}f}"] if metric else []), f"{row['bytes']:,}",
                 f"{row['running_bytes']:,}", f"{row['latency_ms']:.1f}"]
        table.add_row(*cells)
    if len(rows) == 2:
        a, b = rows
        ratio = [f"×{b[metric] / a[metric]:.{places - 1}f}"] if metric else []
        table.add_row("compiled / original", *ratio, f"×{b['bytes'] / a['bytes']:.3f}",
                      f"×{b['running_bytes'] / a['running_bytes']:.3f}", f"×{b['latency_ms'] / a['latency_ms']:.2f}")
    return table
