"""Syntax errors (dsl/syntax_errors.py) in one-line policies and in an unclosed `{…}` set: the
same targeted message as on a rule's own line."""
import pytest

from slimfx import SpecError, parse


def error_of(text: str, bare: bool = False) -> SpecError:
    with pytest.raises(SpecError) as e:
        parse(text, bare=bare)
    return e.value


@pytest.mark.parametrize("rule, listed", [
    ("keep blocks.{q,v", "expected `,` or `}`"),
    ("precision head choose {int8, int4", "expected `,`, a name or `}` after `precision <selector>`"),
])
def test_a_set_left_open_at_the_lines_end_asks_for_its_closing_brace(rule, listed):
    """The line's end was answered "expected `,`": the `}` that closes the set was dropped as if
    it could only close the policy."""
    for text in ("policy p {\n    " + rule + "\n}\n", "policy p { " + rule + "\n}\n"):
        err = error_of(text)
        assert err.kind == "missing-value" and listed in err.message
    assert "`}`" not in error_of("policy p {\n    quantize head\n}\n").message  # no set open: `}` closes the policy


@pytest.mark.parametrize("rule, message, column", [
    ("heal blocks[0] method=linear", "`heal` takes no selector, only `name=value` parameters", 17),
    ("tokens unpad blocks[0]", "`tokens unpad` takes no selector (and no parameters)", 25),
])
def test_a_one_line_policy_gets_the_rules_own_message(rule, message, column):
    """The rule's keyword was taken from the line's first word, `policy`: "expected `=`, got `[`"."""
    err = error_of("policy p { " + rule + " }\n")
    assert err.message == message and (err.line, err.column) == (1, column)
    assert error_of("policy p {\n" + rule + "\n}\n").message == message


@pytest.mark.parametrize("text, message", [
    ("policy p { quantize head }", "the `quantize` rule ends before its required part: expected a bit format such "
                                   "as `int8` or `int4` after `quantize <selector>`"),
    ("policy p {quantize head}", "the `quantize` rule ends before its required part"),
    ("policy p { tokens after blocks[0] }", "expected a token action, `prune` or `merge` after "
                                            "`tokens after <selector>`"),
    ("policy p { precision head choose {int8, int4} }", "expected `budget` after `precision <selector>`"),
    ("policy p { adapt head lora rank= }", "`rank` has no value"),
    ("policy p { adapt head int8 }", "expected an adapter kind, `lora` or `dora` after `adapt <selector>`, got `int8`"),
])
def test_a_rule_cut_short_by_a_one_line_policys_brace_says_what_it_lacks(text, message):
    err = error_of(text)
    assert message in err.message and err.kind == ("syntax" if "got" in message else "missing-value")


def test_a_brace_inside_the_rule_starts_no_rule():
    """Only a `policy NAME {` header starts a rule on the line; a selector's `{` does not."""
    err = error_of("policy p { quantize blocks.{q int8 }")
    assert err.message == "expected `,` or `}` after `quantize <selector>`, got `int8`"
    assert error_of("keep blocks.{q,v", bare=True).message.endswith("expected `,` or `}`")


@pytest.mark.parametrize("text, listed, bare", [
    ("policy a {}\n@", "expected `policy`, the end of the file or the end of the line, got `@`", False),
    ("policy p {\n drop a\n heal method=linear @\n}", "expected a name, `}` or the end of the line, got `@`", False),
])
def test_a_character_the_lexer_cannot_read_lists_what_the_parser_takes_there(text, listed, bare):
    """It listed the merged LALR look-ahead: rules and `}` at the top level, `,` and `)` after a
    heal's parameter — what the same spot with a character the lexer reads (`,`) did not."""
    assert error_of(text, bare).message == listed


@pytest.mark.parametrize("rule, message, column", [
    ("quantize head int8 group # the group size", "`group` has no value", 25),
    ("quantize head int8 group= # why", "`group` has no value", 26),
    ('quantize head int8 group= # a "quoted" word', "`group` has no value", 26),
    ("quantize head # int8", "the `quantize` rule ends before its required part", 14),
])
def test_a_rule_cut_short_before_a_comment_is_blamed_before_the_comment(rule, message, column):
    """Lark places the line's end after its comment: the caret sat after it, and the word before
    it was the comment's (`size` has no value)."""
    err = error_of("policy p {\n" + rule + "\n}\n")
    assert message in err.message and (err.line, err.column) == (2, column) and err.kind == "missing-value"


def test_keep_without_its_value_in_a_prune_is_a_missing_value_not_a_second_rule():
    """`keep` is a rule and a parameter of `tokens after … prune`: "`score` follows `keep` on the
    same line; write one rule per line"."""
    err = error_of("tokens after blocks[1] prune keep score=norm", bare=True)
    assert (err.kind, err.message, err.hint) == ("missing-value", "`keep` has no value", "write `keep=<value>`")
    assert err.column == 30  # under `keep`, not `score`
    assert error_of("quantize head int8 keep embed", bare=True).message == "`embed` follows `keep` on the same line"


@pytest.mark.parametrize("rule, name, column", [
    ("adapt head lora rank alpha=16", "rank", 17),
    ("quantize head int8 group sym=false", "group", 20),
    ("drop blocks auto(count score=angular)", "count", 18),
    ("collapse blocks auto(ratio, interval=2)", "ratio", 22),
    ("drop blocks auto(count)", "count", 18),
    ("precision blocks.* choose { int4 group, int8 } budget avg_bits<=6 by output_mse", "group", 34),
    ("precision blocks.* choose { int8, int4 group } budget avg_bits<=6 by output_mse", "group", 40),
    ("precision blocks.* choose { int4 group sym=true, int8 } budget avg_bits<=6 by output_mse", "group", 34),
])
def test_a_parameter_without_its_value_before_the_next_one_is_named(rule, name, column):
    """It said "expected `=` after `adapt <selector>`, got `alpha`", the caret under `alpha`
    (only a parameter last on its line was named: `adapt head lora rank`). A format choice's
    parameters count as the precision rule's own."""
    err = error_of(rule, bare=True)
    assert (err.kind, err.message, err.hint) == ("missing-value", f"`{name}` has no value", f"write `{name}=<value>`")
    assert (err.line, err.column) == (1, column)


@pytest.mark.parametrize("rule, word, hint", [
    ("adapt head lora fooo alpha=16", "fooo", "remove `fooo`"),
    # `ratio` is auto's, not drop's: `ratio=0.5` there is refused
    ("drop blocks auto(count=2) ratio x=1", "ratio", "a parameter of `auto(…)`"),
    ("precision head choose { int4, int8 } budget avg_bits<=6 by output_mse group sym=true", "group",
     "after its format inside `choose {…}`"),  # a choice's
])
def test_a_word_that_is_no_parameter_where_it_stands_before_another_is_still_a_syntax_error(rule, word, hint):
    """Told "`ratio` has no value; write `ratio=<value>`", the user wrote it and was refused again."""
    err = error_of(rule, bare=True)
    assert err.kind == "syntax" and err.message.startswith(f"`{word}` is not a parameter of ") and hint in err.hint
    assert err.column == rule.index(f" {word}") + 2


@pytest.mark.parametrize("rule, message, hint", [
    ("keep head embed", "`embed` is not a parameter of `keep` (it takes no parameters)", "`keep {head,embed}`"),
    ("keep head embed  # and the embedding", "`embed` is not a parameter of `keep`", "`keep {head,embed}`"),
    ("quantize head int8 int4", "the rule takes one format, `int8` here", "choose {int8, int4} budget"),
    ("quantize head int8 int4 group=32", "the rule takes one format, `int8` here", "choose {int8, int4} budget"),
    ("adapt head lora dora", "the rule takes one adapter kind, `lora` here", "one of `lora` and `dora`"),
    ("tokens after blocks[1] prune attention", "`attention` is not a parameter of `tokens after … prune`: it is a "
                                               "value of `score`", "write `score=attention`"),
    ("quantize head int8 rtn", "it is a value of `method`", "write `method=rtn`"),
    # named by the action, not the word before (`tokens after … ratio=0.5`)
    ("tokens after blocks[1] prune ratio=0.5 attention", "not a parameter of `tokens after … prune`",
     "write `score=attention`"),
    ("drop blocks count", "`count` is not a parameter of `drop`", "a parameter of `auto(…)`"),  # not `{blocks,count}`
    ("quantize head int8 keep", "`keep` is not a parameter of `quantize`: it starts a rule", "on a line of its own"),
])
def test_a_last_word_that_is_no_parameter_says_what_it_may_have_meant(rule, message, hint):
    """`keep head embed` was told "`embed` has no value; write `embed=<value>`", which `keep`
    (no parameters) then refused: the fix was `keep {head,embed}`."""
    err = error_of(rule, bare=True)
    word = next(w for w in ("embed", "int4", "dora", "attention", "rtn", "count", "keep") if f" {w}" in rule)
    assert err.kind == "syntax" and message in err.message and hint in err.hint, err.render()
    assert (err.column, err.first.width) == (rule.index(f" {word}") + 2, len(word))


@pytest.mark.parametrize("choose", ["{int8 int4}", "{int8 int4, int2}", "{int8 group=128 int4}"])
def test_a_missing_comma_between_formats_is_named(choose):
    """It said "expected `=` after `precision <selector>`, got `}`": `int4=` cannot fix it. The
    hint names the format before, not its parameter (`group, int4`)."""
    rule = f"precision head choose {choose} budget avg_bits<=5 by output_mse"
    err = error_of(rule, bare=True)
    assert err.message == "expected `,` between the formats of `choose {…}`, got `int4`" and "`int8, int4`" in err.hint
    assert err.column == rule.index("int4") + 1


@pytest.mark.parametrize("text", ["drop blocks auto(ratio=0.5) auto(count=2)",
                                  "collapse blocks auto(count=2) auto(count=1) method=laco"])
def test_a_second_auto_says_one_is_taken(text):
    """It said "expected `=` after `drop <selector>`, got `(`"."""
    err = error_of(text, bare=True)
    assert err.message == "a rule takes one `auto(…)`" and "auto(count=2, score=angular)" in err.hint
