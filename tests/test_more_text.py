"""The larger built-in calibration text: none of it is text `slimfx eval` scores, and it is real
prose of some length, the same on every call, its earlier part unchanged by what came later."""
import pytest

from slimfx import more_text
from slimfx.evaluation import _DOC_SOURCES, eval_text
from slimfx.more_text import FURTHER_SOURCES, MIN_WORDS, MORE_SOURCES, more_texts


def test_no_source_of_the_scored_text_is_read():
    scored = {s.partition(":")[0] for s in _DOC_SOURCES}
    assert not set(MORE_SOURCES) & scored
    assert not set(FURTHER_SOURCES) & scored
    assert not set(MORE_SOURCES) & set(FURTHER_SOURCES)


def test_no_paragraph_of_it_is_in_the_scored_text():
    scored = eval_text()
    paragraphs = [p for t in more_texts() for p in t.split("\n\n") if len(p.split()) >= 8]
    assert len(paragraphs) > 500
    assert not [p for p in paragraphs if p in scored]


def test_no_eight_words_of_the_scored_text_are_in_it():
    """Stricter than whole paragraphs: not one run of eight words the eval scores (the Language
    Reference's topics quote no docstring of the eval's modules)."""
    def runs(text: str) -> set[tuple[str, ...]]:
        words = text.split()
        return {tuple(words[i:i + 8]) for i in range(len(words) - 7)}

    scored = runs(eval_text())
    assert len(scored) > 2000
    assert not scored & set().union(*map(runs, more_texts()))


def test_texts_are_long_distinct_and_stable():
    texts = more_texts()
    assert sum(len(t.split()) for t in texts) > 100_000  # ≈ 226k SmolLM2 tokens on Python 3.11
    assert all(len(t.split()) >= MIN_WORDS for t in texts)
    assert len(set(texts)) == len(texts)
    more_texts.cache_clear()
    assert more_texts() == texts


def test_later_sources_only_add_after_the_first(monkeypatch):
    """calib=N keeps its rows for every N the 48 first modules gave (75,899 SmolLM2 tokens):
    the further modules and the Reference's topics come after them, and are there."""
    everything = more_texts()
    monkeypatch.setattr(more_text, "FURTHER_SOURCES", ())
    monkeypatch.setattr(more_text, "_reference_topics", lambda: [])
    more_texts.cache_clear()
    try:
        first = more_texts()
    finally:
        more_texts.cache_clear()
    assert everything[:len(first)] == first
    assert len(everything) > len(first) + 300


@pytest.mark.parametrize("name", ["assert", "lambda"])
def test_the_reference_topics_are_read(name):
    from pydoc_data.topics import topics

    assert more_text._clean(topics[name]) in more_texts()


def test_a_module_a_python_build_lacks_is_skipped():
    assert more_text._import("no_such_module_in_any_python") is None
    assert more_text._documented(None) == []
