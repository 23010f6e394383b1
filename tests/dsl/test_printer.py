"""Canonical printing: golden output, comments kept, parse(format(p)) == p for every policy."""
from pathlib import Path

import pytest
from hypothesis import given

from slimfx import format_spec, parse
from slimfx.dsl import ast as A
from slimfx.dsl.printer import format_rule
from slimfx.testing import policies

SPECS = sorted((Path(__file__).parents[2] / "specs").glob("*.slim"))

MESSY = """\
# leading file comment
policy   edge{   # header note
  collapse   blocks auto( threshold=0.90 , ratio=0.25 )   method = laco


  # why int4
  quantize blocks.*.**:Linear int4 method=gptq group=64
  adapt blocks.*.attn.{ q , v } lora alpha=32 rank=16   # trailing
  precision blocks choose{int8,int4 group=32}budget bytes<=64MiB by output_mse
  # closing remark
}
policy tiny {}
# end of file
"""

CANONICAL = """\
# leading file comment
policy edge {  # header note
    collapse blocks auto(ratio=0.25, threshold=0.9) method=laco

    # why int4
    quantize blocks.*.** : Linear int4 group=64 method=gptq
    adapt blocks.*.attn.{q,v} lora rank=16 alpha=32  # trailing
    precision blocks choose {int8, int4 group=32} budget bytes<=64MiB by output_mse
    # closing remark
}

policy tiny {
}
# end of file
"""


def test_golden_canonical_form_keeps_every_comment():
    assert format_spec(parse(MESSY)) == CANONICAL
    assert format_spec(parse(CANONICAL)) == CANONICAL


def test_blank_lines_between_comments_and_below_them_stay_where_they_are():
    """`# header` then a blank line then `policy` lost the blank (the header glued to the policy,
    and `fmt --check` failed on the file `fmt --write` would not leave alone); a blank between two
    comments moved above both; a comment, a blank, then a rule: the comment joined the rule."""
    text = ("# header\n\npolicy p {\n    # a\n\n    # b\n    keep head\n\n    # about the next rule\n\n"
            "    keep embed\n}\n\n# end\n\n# really the end\n")
    assert format_spec(parse(text)) == text
    assert format_spec(parse("\n\n# top\n\n\n\npolicy p {\n    keep head\n}\n\n\n")) == \
        "# top\n\npolicy p {\n    keep head\n}\n"


def test_a_comment_after_a_rule_on_the_policy_line_stays_with_the_rule():
    # The header took it, and fmt printed it on `policy a {`, away from the rule it explained.
    out = format_spec(parse("policy a { quantize head int8  # why\n  keep blocks  # k\n}\n"))
    assert out == "policy a {\n    quantize head int8  # why\n    keep blocks  # k\n}\n"
    assert format_spec(parse("policy a {  # head\n  keep head\n}\n")) == "policy a {  # head\n    keep head\n}\n"


@pytest.mark.parametrize("text, out", [
    ("policy a {\n    keep x\n} policy b { keep y }  # about b\n",
     "policy a {\n    keep x\n}\n\npolicy b {\n    keep y  # about b\n}\n"),
    ("policy a { keep x } policy b {  # hb\n keep y\n}\n",
     "policy a {\n    keep x\n}\n\npolicy b {  # hb\n    keep y\n}\n"),
    ("policy a {\n    keep x\n}  # end of a\npolicy b {\n    keep y\n}\n",
     "policy a {\n    keep x\n}  # end of a\n\npolicy b {\n    keep y\n}\n"),
    # the brace closing a rule's own line leaves its comment to the rule, as on one line
    ("policy a {\n    keep x }  # c\n", "policy a {\n    keep x  # c\n}\n"),
    ("policy a { keep x }  # c\n", "policy a {\n    keep x  # c\n}\n"),
])
def test_a_comment_after_several_nodes_on_one_line_goes_with_the_last(text, out):
    """`} policy b { keep y }  # about b` gave the comment to policy a's closing brace."""
    assert format_spec(parse(text)) == out
    assert format_spec(parse(out)) == out


def test_bare_rules_keep_the_last_rules_comment_on_the_rule():
    """The made-up closing brace of bare rules sits on the last rule's line: it took the comment."""
    out = format_spec(parse("keep head\nkeep blocks[0].mlp  # the MLP stays float\n", bare=True))
    assert out.splitlines()[-2:] == ["    keep blocks[0].mlp  # the MLP stays float", "}"]


def test_heal_prints_its_params_in_schema_order_and_round_trips():
    text = "policy p {\n  drop blocks auto( count=2 )\n  heal   distill=true method=lora steps=200 # why\n  heal method=linear\n}"
    out = format_spec(parse(text))
    assert out == ("policy p {\n    drop blocks auto(count=2)\n    heal method=lora steps=200 distill=true  # why\n"
                   "    heal method=linear\n}\n")
    assert parse(out) == parse(text)


@pytest.mark.parametrize("text, comments", [
    ("# c\nkeep a", ["# c"]), ("keep a\n# c", ["# c"]), ("# c\n", ["# c"]),
    ("keep a\n\n# c\n\nkeep b\n# d", ["# c", "# d"]), ("# why\n  keep a  # tail\n", ["# why", "# tail"]),
])
def test_rules_parsed_bare_keep_every_comment_in_print(text, comments):
    """A comment on the first line or after the last rule of bare rules was lost: the inline
    policy's span reached over the newlines around its rules."""
    out = format_spec(parse(text, bare=True))
    assert [line.strip().split("  ")[-1] for line in out.splitlines() if "#" in line] == comments
    assert parse(out).policies[0].rules == parse(text, bare=True).policies[0].rules


def test_tokens_unpad_prints_alone_with_its_comment_and_round_trips():
    text = ("policy p {\n  # unpad first\n  tokens   unpad   # why\n  tokens after blocks[1]  prune keep=0.5\n"
            "  tokens unpad\n}\n")
    spec = parse(text, check=False)  # the second unpad is a check error, not a printing one
    out = format_spec(spec)
    assert out == ("policy p {\n    # unpad first\n    tokens unpad  # why\n    tokens after blocks[1] prune keep=0.5\n"
                   "    tokens unpad\n}\n")
    assert parse(out, check=False) == spec
    assert format_rule(A.Unpad()) == "tokens unpad"


def test_empty_spec_prints_empty():
    assert format_spec(parse("")) == ""
    assert format_spec(parse("# just a note\n")) == "# just a note\n"


def test_values_print_in_their_canonical_spelling():
    text = 'policy p {\n    adapt a lora alpha=16.0 dropout=0.05\n    quantize b int8 method=gptq damp=1e-05\n}\n'
    out = format_spec(parse(text))
    assert "alpha=16 dropout=0.05" in out and "damp=1e-05" in out
    assert parse(out) == parse(text)


def test_zero_prints_after_sym_and_round_trips():
    text = ("policy p {\n    quantize a int4 zero=float sym=false group=32\n"
            "    precision b choose {int4 zero=float sym=false, int8} budget avg_bits<=6 by output_mse\n}\n")
    out = format_spec(parse(text))
    assert "quantize a int4 group=32 sym=false zero=float\n" in out
    assert "choose {int4 sym=false zero=float, int8}" in out
    assert parse(out) == parse(text)


def test_adapter_dtype_prints_after_init_and_round_trips():
    text = "policy p {\n    adapt a dora merge=false dtype=bf16 init=error rank=4\n    quantize a int4\n}\n"
    out = format_spec(parse(text, check=False))
    assert "adapt a dora rank=4 init=error dtype=bf16 merge=false\n" in out
    assert parse(out, check=False) == parse(text, check=False)


def test_shipped_specs_are_canonical():
    assert SPECS, "specs/ holds the example policies"
    for path in SPECS:
        text = path.read_text()
        assert format_spec(parse(text)) == text, f"{path.name}: run `slimfx fmt --write {path}`"


@given(policies())
def test_round_trip_text_ast_canonical_ast(text):
    spec = parse(text)
    canonical = format_spec(spec)
    again = parse(canonical)
    assert again == spec
    assert format_spec(again) == canonical  # idempotent
    # no comment is lost
    assert canonical.count("#") == sum(line.count("#") for line in text.splitlines() if "#" in line)


def test_every_string_parse_accepts_prints_back_as_itself():
    """`from="\\ud800"` and `from="\\x00"` were accepted, and then `fmt` crashed or printed a raw NUL
    that did not re-parse; now parse refuses them (tests/dsl/test_errors.py), and what it accepts
    (escaped quotes and backslashes, a tab, non-ASCII) survives the printer."""
    for written in [r'"a\"b\\c"', '"tab\there"', r'"tab\there"', r'"caf\u00e9/é/😀"', r'"\\\\server\\dir"']:
        spec = parse(f"policy p {{\n    adapt head lora from={written}\n}}\n")
        text = format_spec(spec)
        text.encode("utf-8")  # no surrogate left for `fmt` to fail on
        assert parse(text) == spec, text


def test_characters_that_print_as_nothing_or_a_line_break_are_written_as_escapes():
    """A tab, U+2028 and a no-break space were printed raw: invisible in the file, and U+2028 a
    line break to editors (str.splitlines split the rule there)."""
    spec = parse('policy p {\n    adapt head lora from="a\\tb\\u2028c\\u00a0d é"\n}\n')
    text = format_spec(spec)
    assert 'from="a\\tb\\u2028c\\xa0d é"' in text and len(text.splitlines()) == 3, text
    assert parse(text) == spec
