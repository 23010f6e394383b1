"""compile() / plan(): how the policy argument is read — a path, policy text, bare rules, a Spec or
a Policy — and each way it is refused (no file, several policies, names, no rules)."""
import re

import pytest
from hypothesis import assume, given, settings

import slimfx
from slimfx import SpecError
from slimfx.models import tiny
from slimfx.testing import bare_rules, invalid_policies

SPEC = "policy p {\n    quantize blocks.*.** : Linear int4\n}\n"


def test_policy_as_path_text_spec_and_policy(tmp_path):
    loaded = tiny("llama")
    f = tmp_path / "p.slim"
    f.write_text(SPEC)
    spec = slimfx.parse(SPEC)
    for policy in (str(f), f, SPEC, spec, spec.policy("p")):
        plan = slimfx.plan(loaded, policy)
        assert plan.policy.name == "p" and len(plan.rules[0].targets) == 14


def test_missing_policy_file_and_several_policies_need_a_name(tmp_path):
    loaded = tiny("llama")
    with pytest.raises(SpecError, match="no policy file"):
        slimfx.plan(loaded, str(tmp_path / "nope.slim"))
    two = "policy a {\n keep head\n}\npolicy b {\n keep embed\n}\n"
    with pytest.raises(SpecError, match="holds 2 policies"):
        slimfx.plan(loaded, two)
    assert slimfx.plan(loaded, two, name="b").policy.name == "b"


def test_bare_rules_are_one_inline_policy_with_the_users_line_numbers():
    loaded = tiny("llama")
    cm = slimfx.compile(loaded, "# int8 attention\nquantize blocks.*.attn.* : Linear int8\nkeep head")
    assert cm.report.policy == "inline" and [r.line for r in cm.report.rules] == [2, 3]
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "keep head\nquantize blocks.*.atn.* int8")
    assert e.value.kind == "selector" and e.value.line == 2
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "quantize_me.slim")
    assert e.value.kind == "no-file"


@settings(max_examples=150, deadline=None)
@given(bare_rules())
def test_every_drawn_line_of_rules_is_read_as_rules(text):
    """compile(model, text) decides whether a string is a file, policy text or bare rules: every
    drawn list of rules (with comments, blank lines, odd spacing; one line or many) must come out
    as those rules."""
    from slimfx.api import _read_spec
    from slimfx.dsl.parser import parse

    bare = parse(text, bare=True).policies
    assume(bare[0].rules)  # comments alone are the empty policy either way
    assert _read_spec(text).policies == bare


@settings(max_examples=150, deadline=None)
@given(invalid_policies(bare=True))
def test_every_drawn_mistake_in_rules_is_reported_as_parse_reports_it(mistake):
    """compile(model, text) read `quantise head int8\n` (one line and its newline) as a policy
    file's text: "expected `policy`" where parse(text, bare=True) says unknown-keyword and
    did-you-mean; 7 of 60 drawn mistakes were reported as another kind."""
    from slimfx.api import _read_spec
    from slimfx.dsl.parser import parse

    with pytest.raises(SpecError) as want:
        parse(mistake.text, bare=True)
    with pytest.raises(SpecError) as got:
        _read_spec(mistake.text)
    assert [(d.kind, d.line, d.column) for d in got.value.diagnostics] == \
        [(d.kind, d.line, d.column) for d in want.value.diagnostics]


def test_errors_in_bare_rules_point_at_the_users_own_columns_on_every_line():
    """The first line's columns were off by 16: the rules were wrapped in `policy inline { `."""
    loaded = tiny("llama")
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "quantize blocks.*.atn.* int8")
    assert (e.value.line, e.value.column) == (1, 10) and e.value.source_line == "quantize blocks.*.atn.* int8"
    assert "\n             ^^^^^^^^^^^^^^\n" in str(e.value)  # the caret under the selector, not 16 further on
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "quantize head int9")
    assert (e.value.kind, e.value.line, e.value.column) == ("unknown-keyword", 1, 15)
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "keep head\nquantize blocks[99] int8")
    assert (e.value.line, e.value.column) == (2, 10)
    with pytest.raises(SpecError, match="did you mean `quantize`") as e:  # it said "expected `policy`"
        slimfx.compile(loaded, "quantise head int8\nkeep embed")
    assert (e.value.kind, e.value.line, e.value.column) == ("unknown-keyword", 1, 1)
    with pytest.raises(SpecError, match="did you mean `policy`"):  # a misspelt header is still a header
        slimfx.compile(loaded, "polcy p {\n    keep head\n}\n")


def test_one_line_of_policy_text_is_parsed_as_rules_not_looked_up_as_a_file():
    """`quantise head int8` was reported as "no policy file 'quantise head int8'"."""
    loaded = tiny("llama")
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "quantise head int8")
    assert e.value.kind == "unknown-keyword" and "did you mean `quantize`?" in str(e.value)
    with pytest.warns(UserWarning, match="the policy has no rules"):
        assert slimfx.compile(loaded, "# nothing yet").report.rules == ()
    for name in ("gone.slim", "my policy.slim", "specs/gone", "specs/v{2}.slim", "v{2}.slim"):
        with pytest.raises(SpecError) as e:
            slimfx.compile(loaded, name)
        assert e.value.kind == "no-file", name


def test_a_policy_object_with_another_name_is_refused():
    """name= was ignored when the policy was a Policy: the one given ran, whatever name said."""
    policy = slimfx.parse("policy a {\n    quantize head int8\n}\n").policies[0]
    with pytest.raises(SpecError, match="no policy `b`: the Policy given is `a`"):
        slimfx.plan(tiny("llama"), policy, name="b")
    assert slimfx.plan(tiny("llama"), policy, name="a").policy.name == "a"


def test_a_policy_given_without_rules_warns_and_the_default_does_not(tmp_path):
    """An emptied policy file compiled the model unchanged without a word (`slimfx compile`
    refuses it); leaving the policy out is how the model is captured alone."""
    import warnings

    empty = tmp_path / "empty.slim"
    empty.write_text("# nothing yet\n")
    lm = tiny("llama")
    for policy, says in ((empty, f"the policy ({empty}) has no rules"), ("policy p {}", "policy `p` has no rules"),
                         ("# a comment", "the policy has no rules")):
        with pytest.warns(UserWarning, match=re.escape(says) + ": the compiled model computes what the original does"):
            slimfx.compile(lm, policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimfx.compile(lm)
        slimfx.compile(lm, "")


def test_a_policy_passed_alone_shows_its_errors_in_its_own_text(tmp_path):
    """The Policy kept no text: its errors printed `<policy>:3:14` over an empty line and a caret
    at nothing, whatever file it was parsed from."""
    path = tmp_path / "edge.slim"
    path.write_text("policy a {\n    keep head\n    quantize blocks.*.attn.nope int8\n}\n")
    for policy in (slimfx.parse_file(path).policies[0], slimfx.parse(path.read_text()).policies[0]):
        with pytest.raises(SpecError, match="matches nothing") as info:
            slimfx.compile(tiny("llama"), policy)
        lines = str(info.value).splitlines()
        assert lines[0].startswith(f"{policy.filename}:3:14: error[selector]")
        assert lines[1:3] == ["        quantize blocks.*.attn.nope int8", " " * 17 + "^" * 18]
    assert slimfx.parse_file(path).policies[0].filename == str(path)


def test_an_error_without_policy_text_shows_no_empty_line():
    from slimfx.dsl.errors import Diagnostic

    assert Diagnostic("selector", "matches nothing", 1, 14).render("") == "<policy>:1:14: error[selector]: matches nothing"


@pytest.mark.parametrize("name", [3, ["a"]])
def test_a_name_that_is_no_string_is_a_type_error(name):
    """It was an AttributeError from inside the "did you mean" of the policy names ('int' object
    has no attribute 'lower'), in compile, plan and check_policy alike."""
    with pytest.raises(TypeError, match=r"name= is the name of a policy in the file \(a string\), not the"):
        slimfx.plan(tiny("llama"), "policy a {\n    keep head\n}\n", name=name)


@pytest.mark.parametrize("as_policy", [False, True])
def test_a_spec_parsed_without_its_checks_is_checked_before_compiling(as_policy):
    """parse(…, check=False) skips the checks across rules; compile ran such a Spec's `drop` after
    its `quantize` as written."""
    spec = slimfx.parse("policy a {\n    quantize head int8\n    drop blocks[0]\n}\n", check=False)
    with pytest.raises(SpecError, match="`drop` after `quantize`") as info:
        slimfx.compile(tiny("llama"), spec.policies[0] if as_policy else spec)
    assert info.value.kind == "illegal-order" and info.value.line == 3


def test_of_a_spec_parsed_without_its_checks_only_the_policy_that_runs_is_checked():
    """The whole Spec was checked: a problem in another policy refused the one asked for."""
    text = "policy p {\n    quantize head int8\n    drop blocks[0]\n}\npolicy ok {\n    quantize head int8\n}\n"
    spec = slimfx.parse(text, check=False, filename="two.slim")
    assert slimfx.plan(tiny("llama"), spec, name="ok").policy.name == "ok"
    with pytest.raises(SpecError, match="`drop` after `quantize`") as info:
        slimfx.plan(tiny("llama"), spec, name="p")
    assert str(info.value).startswith("two.slim:3:5: error[illegal-order]") and "drop blocks[0]" in str(info.value)


def test_policy_file_and_name_errors_have_kinds_of_their_own(tmp_path):
    loaded = tiny("llama")
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, str(tmp_path / "missing.slim"))
    assert e.value.kind == "no-file" and "missing.slim" in e.value.message
    two = tmp_path / "two.slim"
    two.write_text("policy a {\n    keep head\n}\npolicy b {\n    keep embed\n}\n")
    for name in (None, "c"):
        with pytest.raises(SpecError) as e:
            slimfx.compile(loaded, str(two), name=name)
        assert e.value.kind == "unknown-policy" and "a, b" in e.value.message
        # a name that was given is not answered "pass name=… to choose one"
        assert e.value.hint == ("use one of the names it lists" if name else "pass name=… (or --policy NAME) to choose one")
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, str(_near(tmp_path)), name="fast_polcy")
    assert e.value.hint == "did you mean `fast_policy`?"


def _near(tmp_path):
    near = tmp_path / "near.slim"
    near.write_text("policy fast_policy {\n    keep head\n}\npolicy slow {\n    keep embed\n}\n")
    return near
