"""Schema checks of single rules (dsl/validate.py): how a wrong value is shown, and values too
large for a number."""
import pytest

from slimfx import SpecError, parse


def error_of(rule: str) -> SpecError:
    with pytest.raises(SpecError) as e:
        parse("policy p {\n    " + rule + "\n}\n")
    return e.value


@pytest.mark.parametrize("param, written, unquoted", [
    ("rank", '"8"', "8"), ("merge", '"true"', "true"), ("alpha", '"32"', "32"), ("dropout", '"0.1"', "0.1"),
])
def test_a_quoted_value_is_shown_quoted_and_the_hint_removes_the_quotes(param, written, unquoted):
    """`rank="8"` said "`rank` takes an integer, not 8", and hinted `rank=8`: what was written."""
    err = error_of(f"adapt head lora {param}={written}")
    assert err.kind == "wrong-type" and err.message.endswith(f", not {written}")
    assert err.hint == f"remove the quotes: `{param}={unquoted}`"


def test_a_quoted_string_that_is_no_valid_value_unquoted_gets_an_example():
    err = error_of('adapt head lora rank="eight bits"')
    assert err.message == '`rank` takes an integer, not "eight bits"' and err.hint == "write e.g. `rank=8`"
    assert error_of('adapt head lora rank="0"').hint == "write e.g. `rank=8`"  # 0 is out of range unquoted too
    assert error_of("adapt head lora merge=yes").message == "`merge` takes true or false, not yes"  # a name: bare
    assert error_of("adapt head lora rank=2.5").message == "`rank` takes an integer, not 2.5"


@pytest.mark.parametrize("rule, param", [
    ("adapt head lora alpha=1{zeros}", "alpha"),
    ("adapt head lora dropout=-1{zeros}", "dropout"),
    ("drop blocks[0]\n    heal method=lora lr=1{zeros}", "lr"),
])
def test_an_integer_past_a_floats_range_is_out_of_range_not_an_internal_error(rule, param):
    """float() of a 400-digit integer raised OverflowError: "a bug in slimfx"."""
    err = error_of(rule.format(zeros="0" * 400))
    assert err.kind == "out-of-range" and err.message.startswith(f"`{param}` is too large")
    assert err.line == rule.count("\n") + 2


@pytest.mark.parametrize("rule, param", [("adapt head lora alpha=1e400", "alpha"), ("adapt head lora rank=1e400", "rank"),
                                         ("tokens after blocks[1] prune keep=1e400", "keep")])
def test_a_float_past_a_floats_range_is_too_large_not_inf(rule, param):
    """`1e400` reads as inf: "`alpha=inf` is out of range: `alpha` is a number > 0", a range inf meets."""
    err = error_of(rule)
    assert err.kind == "out-of-range" and err.message.startswith(f"`{param}` is too large") and "inf" not in err.message
    assert error_of("quantize head int4 method=1e400").kind == "wrong-type"  # a name's parameter: not a size


def test_a_byte_budget_past_a_floats_range_is_out_of_range():
    err = error_of("precision head choose {int8, int4} budget bytes<=1" + "0" * 400 + "GiB by output_mse")
    assert err.kind == "out-of-range" and "too large" in err.message and (err.line, err.column) == (2, 40)
    assert error_of("precision head choose {int8, int4} budget bytes<=1e400 by output_mse").kind == "out-of-range"


def test_a_misspelt_choice_is_not_called_out_of_range():
    """`method=gtpq` was "out of range" under the kind unknown-keyword; a number stays out of range."""
    with pytest.raises(SpecError) as info:
        parse("quantize head int4 method=gtpq", bare=True)
    assert info.value.kind == "unknown-keyword"
    assert "`method=gtpq` is not one of its choices: `method` is one of rtn, gptq" in info.value.message
    with pytest.raises(SpecError) as info:
        parse("adapt head lora rank=0", bare=True)
    assert "`rank=0` is out of range" in info.value.message


# ---- what the mutation audit found untested (each kills a mutant the other tests let by) ----------


def _rules(*rules: str):
    return parse("policy p {\n" + "\n".join("    " + r for r in rules) + "\n}\n").policy("p").rules


def test_an_upper_case_exponent_reads_as_a_number():
    """`1E-3` reached int() on a parser testing for `.e` only: an internal error, not 0.001."""
    assert _rules("adapt head lora dropout=1E-3")[0].get("dropout") == pytest.approx(1e-3)
    assert _rules("adapt head lora alpha=2E1")[0].get("alpha") == 20.0


@pytest.mark.parametrize("rule", ["drop blocks auto(ratio=0.5, count=2, score=influence)",
                                  "collapse blocks auto(count=2, ratio=0.5, threshold=0.8)"])
def test_ratio_and_count_together_are_refused_beside_other_auto_params(rule):
    err = error_of(rule)
    assert err.kind == "invalid-combination" and "not both" in err.message


def test_a_zero_step_inside_alternatives_is_refused_by_parse():
    err = error_of("keep {blocks[::0], head}")
    assert err.kind == "out-of-range" and "step cannot be zero" in err.message


@pytest.mark.parametrize("allowed, past", [
    ("precision head choose {int8} budget avg_bits<=32 by output_mse",
     "precision head choose {int8} budget avg_bits<=32.5 by output_mse"),
    ("quantize head int4 group=16", "quantize head int4 group=8"),
    ("tokens after blocks[1] merge ratio=0.5", "tokens after blocks[1] merge ratio=0.51"),
    ("adapt head lora dropout=0", "adapt head lora dropout=1"),
])
def test_each_bound_is_inclusive_where_the_readme_says_so(allowed, past):
    _rules(allowed)
    assert error_of(past).kind == "out-of-range"


def test_token_rules_on_different_blocks_must_say_the_same_restore():
    with pytest.raises(SpecError) as e:
        _rules("tokens after blocks[1] prune restore=true", "tokens after blocks[2] merge")
    assert e.value.kind == "invalid-combination" and "restore=" in e.value.message and e.value.line == 3


@pytest.mark.parametrize("rule, kind", [
    ('quantize head int4 zero=float sym="true"', "wrong-type"),
    ("quantize head int4 zero=float sym=yes", "wrong-type"),
    ("quantize head int4 method=1 damp=0.01", "wrong-type"),
    ("quantize head int4 method=qqq refit=true act_order=true", "out-of-range"),
    ("precision head choose { int4 zero=float sym=1, int8 } budget avg_bits<=6 by output_mse", "wrong-type"),
    ("precision head choose { int4, int8 } budget avg_bits<=6 by output_mse method=rtm damp=0.1", "unknown-keyword"),
])
def test_a_refused_value_is_not_replaced_by_its_default_in_the_checks_of_what_it_goes_with(rule, kind):
    """A refused `sym`/`method` was dropped before the combination checks, which then read its
    default: `sym="true" zero=float` added "this one is symmetric", `method=1 damp=0.01` added
    "this rule does not use GPTQ" — a second problem that the user did not write."""
    err = error_of(rule)
    assert [d.kind for d in err.diagnostics] == [kind], [d.message for d in err.diagnostics]


@pytest.mark.parametrize("rule", ["quantize head int4 zero=float", "quantize head int4 damp=0.01",
                                  "quantize head int4 rank=8 zero=float"])
def test_a_combination_with_a_default_left_out_is_still_refused(rule):
    assert "invalid-combination" in {d.kind for d in error_of(rule).diagnostics}


@pytest.mark.parametrize("alpha", ["3.5e38", "1e308"])
def test_an_alpha_whose_scale_has_no_float32_value_is_out_of_range(alpha):
    """alpha/rank is a float32 factor: infinite, times B's starting zeros, it made every output NaN
    and compile said nothing."""
    err = error_of(f"adapt head lora alpha={alpha}")
    assert err.kind == "out-of-range" and "at most 3.4e38 (float32's largest)" in err.message
    parse("policy p {\n    adapt head lora alpha=3.4e38\n}\n")
