"""The larger built-in calibration text: none of it is text `slimfx eval` scores, and it is real
prose of some length, the same on every call."""
from slimfx.evaluation import _DOC_SOURCES, eval_text
from slimfx.more_text import MIN_WORDS, MORE_SOURCES, more_texts


def test_no_source_of_the_scored_text_is_read():
    assert not set(MORE_SOURCES) & {s.partition(":")[0] for s in _DOC_SOURCES}


def test_no_paragraph_of_it_is_in_the_scored_text():
    scored = eval_text()
    paragraphs = [p for t in more_texts() for p in t.split("\n\n") if len(p.split()) >= 8]
    assert len(paragraphs) > 500
    assert not [p for p in paragraphs if p in scored]


def test_texts_are_long_distinct_and_stable():
    texts = more_texts()
    assert sum(len(t.split()) for t in texts) > 40_000  # ≈ 70k SmolLM2 tokens on Python 3.11
    assert all(len(t.split()) >= MIN_WORDS for t in texts)
    assert len(set(texts)) == len(texts)
    more_texts.cache_clear()
    assert more_texts() == texts
