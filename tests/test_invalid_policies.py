"""invalid_policies(): one mistake per draw, and parse() reports the kind and the line it claims.

The strategy does not look at parse()'s diagnostics (it only redraws text that parse() accepts),
so these tests check the parser and checker: that a mistake is reported as its kind, alone, at
its line."""
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from slimfx import parse
from slimfx.dsl.errors import ERROR_KINDS, SpecError
from slimfx.testing import MISTAKE_KINDS, InvalidPolicy, invalid_policies


def _diagnostics(text: str) -> list:
    with pytest.raises(SpecError) as info:
        parse(text)
    return info.value.diagnostics


@pytest.mark.parametrize("kind", MISTAKE_KINDS)
def test_each_mistake_is_reported_as_its_kind_alone_at_its_line(kind):
    @settings(max_examples=40)
    @given(invalid_policies(kinds=[kind]))
    def check(bad):
        assert bad.kind == kind
        found = _diagnostics(bad.text)
        assert {d.kind for d in found} == {kind}, [(d.kind, d.line, d.message) for d in found]
        assert bad.line in {d.line for d in found}, [(d.kind, d.line, d.message) for d in found]

    check()


@pytest.mark.parametrize("kind", MISTAKE_KINDS)
def test_bare_rules_with_a_mistake_are_reported_as_its_kind_alone_at_its_line(kind):
    """bare=True: rules alone, as compile(model, text) takes them; lines are the rules' own."""
    @settings(max_examples=15)
    @given(invalid_policies(kinds=kind, bare=True))
    def check(bad):
        assert bad.kind == kind and "policy bare {" not in bad.text  # the wrapper the edits were made in is gone
        found = _diagnostics_bare(bad.text)
        assert {d.kind for d in found} == {kind}, [(d.kind, d.line, d.message) for d in found]
        assert bad.line in {d.line for d in found}, [(d.kind, d.line, d.message) for d in found]

    check()


@pytest.mark.parametrize("kind", MISTAKE_KINDS)
def test_bare_rules_with_no_rule_to_edit_get_one_for_the_mistake(monkeypatch, kind):
    import slimfx.invalid_policies as module

    monkeypatch.setattr(module, "bare_rules", lambda: st.just("# only a comment"))

    @settings(max_examples=10, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(invalid_policies(kinds=kind, bare=True))
    def check(bad):
        assert bad.text.startswith("# only a comment\n")
        found = _diagnostics_bare(bad.text)
        assert {d.kind for d in found} == {kind} and bad.line in {d.line for d in found}

    check()


def _diagnostics_bare(text: str) -> list:
    with pytest.raises(SpecError) as info:
        parse(text, bare=True)
    return info.value.diagnostics


def test_every_kind_is_drawn_by_default_and_all_are_error_kinds():
    seen = set()

    @settings(max_examples=150, database=None, derandomize=True, phases=[Phase.generate])
    @given(invalid_policies())
    def collect(bad):
        seen.add(bad.kind)

    collect()
    assert seen == set(MISTAKE_KINDS) and seen <= set(ERROR_KINDS)


@pytest.mark.parametrize("kind", MISTAKE_KINDS)
@pytest.mark.parametrize("drawn", ["", "# only a comment\n", "policy empty { }\n"])
def test_a_draw_with_no_rule_to_edit_gets_a_policy_for_the_mistake(monkeypatch, kind, drawn):
    """policies() draws comment-only texts and empty policies; the mistake goes in a policy added
    for it (a name apart from the drawn ones), and is still reported as its kind at its line."""
    import slimfx.invalid_policies as module

    monkeypatch.setattr(module, "policies", lambda: st.just(drawn))

    @settings(max_examples=15, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(invalid_policies(kinds=kind))
    def check(bad):
        assert bad.text.startswith(drawn.rstrip(" ")) and bad.text.count("policy ") == drawn.count("policy ") + 1
        found = _diagnostics(bad.text)
        assert {d.kind for d in found} == {kind} and bad.line in {d.line for d in found}

    check()


def test_an_edit_the_text_makes_valid_is_redrawn_and_named(monkeypatch):
    """A redraw is a hypothesis event (`pytest --hypothesis-show-statistics`), so a mistake that
    stopped being one would show, not shrink coverage unseen."""
    import slimfx.invalid_policies as module
    from hypothesis.errors import Unsatisfiable

    named = []
    monkeypatch.setattr(module, "event", named.append)
    monkeypatch.setattr(module, "parse", lambda text, **options: None)  # every edit accepted
    monkeypatch.setattr(module, "policies", lambda: st.just("policy p {\n    adapt x lora rank=8\n}\n"))

    @settings(max_examples=1, database=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(invalid_policies(kinds="duplicate"))
    def draw(bad):
        pass

    with pytest.raises(Unsatisfiable):
        draw()
    assert named and set(named) == {"invalid_policies(): redrawn, duplicate accepted"}


def test_hardly_any_draw_is_redrawn(monkeypatch):
    """Each kind's edit makes a mistake wherever it lands: fewer than 1 draw in 20 is redrawn."""
    import slimfx.invalid_policies as module

    named = []
    monkeypatch.setattr(module, "event", named.append)
    drawn = []

    @settings(max_examples=200, database=None, derandomize=True, phases=[Phase.generate])
    @given(invalid_policies())
    def collect(bad):
        drawn.append(bad)

    collect()
    assert len(named) < len(drawn) / 20, named


@pytest.mark.parametrize("kinds, message", [
    (["sytax"], "got 'sytax'"),
    (["selector"], "got 'selector'"),  # a kind only a model can show
    ([], "got none"),
])
def test_kinds_it_cannot_draw_are_refused_with_the_ones_it_can(kinds, message):
    with pytest.raises(ValueError, match=message) as info:
        invalid_policies(kinds=kinds)
    assert "syntax, unknown-keyword" in str(info.value)
    with pytest.raises(TypeError, match="bare=.... is True or False"):
        invalid_policies(bare="yes")


def test_it_is_a_frozen_record_of_text_kind_and_line():
    bad = InvalidPolicy("policy p {\n    heal method=linear\n}\n", "illegal-order", 2)
    assert _diagnostics(bad.text)[0].line == bad.line
    with pytest.raises(AttributeError):
        bad.line = 3


def test_a_set_of_kinds_draws_alike_whatever_the_hash_seed():
    """A set's order follows PYTHONHASHSEED: the same @seed drew other kinds in another process,
    so seeded runs and database replays did not repeat."""
    import os
    import subprocess
    import sys

    script = ("from hypothesis import given, settings, seed\n"
              "from slimfx.testing import invalid_policies\n"
              "kinds = []\n"
              "@seed(1)\n@settings(max_examples=12, database=None)\n"
              "@given(invalid_policies(kinds={'syntax', 'duplicate', 'wrong-type', 'out-of-range'}))\n"
              "def t(bad): kinds.append(bad.kind)\n"
              "t(); print(kinds)\n")
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2, 3)}
    assert len(runs) == 1, runs
    with pytest.raises(TypeError, match=r"a kind or a collection of them .* not 3"):
        invalid_policies(kinds=3)
