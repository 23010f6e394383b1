"""Whatever it is given, parse() raises nothing but SpecError, and never an "internal" one.

10,000 inputs in all: 5,000 arbitrary texts (and bytes) and 5,000 mutations of valid policies
(500 drawn policies, 10 mutations each). Each test prints how many inputs it ran.
"""
from hypothesis import HealthCheck, given, settings, strategies as st

from slimfx import SpecError, parse
from slimfx.testing import policies

ARBITRARY = 5_000
POLICIES, MUTATIONS_EACH = 500, 10
_FUZZ = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))

# Text that is mostly the language's own alphabet, so inputs get past the first token.
_ALPHABET = st.sampled_from(list("{}[]()<>=:.,*#\"\\ \t\n\r\x0c-+_019aeiz") + [
    "policy ", "quantize ", "adapt ", "collapse ", "drop ", "keep ", "tokens after ", "precision ",
    "choose ", "budget ", "avg_bits", "bytes", " by ", "int4 ", "lora ", "prune ", "merge ", "auto(",
    "blocks", "group=", "rank=", "true", "1e9", "64MiB", "\x00", "\u00e9", "\U0001f600", "\ufeff"])


def _parse_only_spec_error(data) -> None:
    try:
        parse(data)
    except SpecError as e:
        assert e.kind != "internal", str(e)
        str(e)  # rendering must not fail either


def test_arbitrary_text_and_bytes_give_only_spec_error(capsys):
    ran = 0

    @settings(max_examples=ARBITRARY, **_FUZZ)
    @given(st.one_of(st.text(), st.lists(_ALPHABET, max_size=60).map("".join), st.binary()))
    def check(data):
        nonlocal ran
        ran += 1
        _parse_only_spec_error(data)

    check()
    with capsys.disabled():
        print(f"\n[fuzz] arbitrary inputs fed to parse(): {ran}")
    assert ran >= ARBITRARY


@st.composite
def _mutated(draw, text: str) -> str:
    """One random edit of `text`: delete, duplicate, or insert a span, or swap two lines."""
    if not text:
        return draw(st.text(max_size=5))
    i = draw(st.integers(0, len(text) - 1))
    j = draw(st.integers(i, min(len(text), i + 12)))
    op = draw(st.sampled_from(["delete", "duplicate", "insert", "swap"]))
    if op == "delete":
        return text[:i] + text[j:]
    if op == "duplicate":
        return text[:j] + text[i:j] + text[j:]
    if op == "insert":
        return text[:i] + "".join(draw(st.lists(_ALPHABET, max_size=4))) + text[i:]
    lines = text.split("\n")
    a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
    lines[a], lines[b] = lines[b], lines[a]
    return "\n".join(lines)


def test_mutated_valid_policies_give_only_spec_error(capsys):
    ran = 0

    @settings(max_examples=POLICIES, **_FUZZ)
    @given(policies(), st.data())
    def check(text, data):
        nonlocal ran
        parse(text)  # the unmutated policy is valid
        for _ in range(MUTATIONS_EACH):
            ran += 1
            _parse_only_spec_error(data.draw(_mutated(text)))

    check()
    with capsys.disabled():
        print(f"\n[fuzz] mutated policies fed to parse(): {ran}")
    assert ran >= POLICIES * MUTATIONS_EACH
