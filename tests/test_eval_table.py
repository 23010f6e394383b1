"""slimfx eval's table (eval_table.py): it keeps to the positions a model has, says why a column is
missing and what each column measured, and shows cosines near 1 to six places."""
import math

import pytest

from slimfx import eval_table as et
from slimfx import evaluation as ev
from slimfx.models import tiny


@pytest.mark.parametrize("arch, longest", [("gpt2", 128), ("opt", 128), ("bert", 128), ("roberta", 128),
                                           ("distilbert", 128)])
def test_eval_keeps_to_the_positions_a_model_has(arch, longest):
    """Windows of 256 tokens and paragraphs of 666 raised index errors on these tiny models of
    128 positions (`slimfx eval --model tiny:gpt2` failed with no --compiled at all). RoBERTa's
    positions start after its padding index (0 here: 129 - 0 - 1; 514 - 1 - 1 = 512 in roberta-base)."""
    from slimfx.eval_table import eval_rows
    from slimfx.evaluation import context_length

    lm = tiny(arch)
    assert context_length(lm.model) == longest
    (row,) = eval_rows(lm, max_tokens=300)
    assert math.isfinite(row.get("perplexity", row.get("cosine")))


def test_eval_of_a_causal_lm_without_a_tokenizer_has_no_text_metric_and_no_error():
    """A local save_pretrained folder holds no tokenizer: eval raised "'NoneType' object is not callable"."""
    import dataclasses

    from slimfx.eval_table import eval_rows

    (row,) = eval_rows(dataclasses.replace(tiny("llama"), tokenizer=None))
    assert "perplexity" not in row and row["bytes"] > 0


def test_the_eval_table_says_why_it_has_no_quality_column():
    """A local model folder without tokenizer files lost its perplexity column without a word."""
    import dataclasses

    bare = dataclasses.replace(tiny("llama"), tokenizer=None)
    table = et.eval_table(bare, max_tokens=32)
    assert table.caption == f"no perplexity: {bare.name} has no tokenizer; CPU latency: median of 10 calls on an " \
        "input of 2×8"
    assert [c.header for c in table.columns][:2] == ["model", "weight bytes"]


def test_the_eval_table_says_what_its_columns_measured():
    """The demo's table gave a perplexity and a latency with no word of the tokens or the input."""
    assert et.eval_table(tiny("llama"), max_tokens=300).caption == (
        "perplexity: the first 300 tokens of the built-in eval text, in windows of 128; CPU latency: median of 10 "
        "calls on an input of 2×8")
    # what it read, not what was asked: one window of 32, and no more tokens than the text has
    assert "the first 32 tokens of the built-in eval text, in windows of 32;" in \
        et.eval_table(tiny("llama"), max_tokens=32).caption
    # 129 tokens in windows of 128 is one window: a last chunk of one token predicts nothing
    assert "the first 128 tokens of the built-in eval text, in windows of 128;" in \
        et.eval_table(tiny("llama"), max_tokens=129).caption
    text = len(tiny("llama").tokenizer(ev.eval_text())["input_ids"])
    assert f"the first {text:,} tokens" in et._measured(tiny("llama"), {}, 10**9, 128)
    caption = et.eval_table(tiny("bert")).caption
    assert caption.startswith(f"cosine: mean over {len(et.EVAL_SENTENCES)} sentences and {len(et.eval_paragraphs())} "
                              "paragraphs of the built-in eval text; CPU latency: median of 10 calls on an input of "
                              "16×"), caption


def test_a_cosine_near_one_is_shown_to_six_places(monkeypatch):
    """The table showed 0.99998 (compiled) and 0.99995 (trained) both as 1.0000, ratio ×1.000."""
    from rich.console import Console

    rows = [{"model": "original", "cosine": 1.0, "bytes": 10, "running_bytes": 10, "latency_ms": 1.0},
            {"model": "compiled", "cosine": 0.99995, "bytes": 5, "running_bytes": 5, "latency_ms": 1.0}]
    monkeypatch.setattr(et, "_eval_rows", lambda *a, **k: (rows, "measured"))
    console = Console(width=200, record=True)
    console.print(et.eval_table(tiny("bert")))
    text = console.export_text()
    assert "0.999950" in text and "1.000000" in text and "×0.99995" in text


def test_the_tables_old_home_still_gives_its_names():
    """eval_rows, eval_table, eval_paragraphs and EVAL_SENTENCES lived in evaluation.py."""
    from slimfx.evaluation import EVAL_SENTENCES, eval_paragraphs, eval_rows, eval_table

    assert (eval_rows, eval_table, eval_paragraphs, EVAL_SENTENCES) == (
        et.eval_rows, et.eval_table, et.eval_paragraphs, et.EVAL_SENTENCES)
    with pytest.raises(AttributeError):
        ev.no_such_name  # noqa: B018
