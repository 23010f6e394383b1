"""Every malformed policy gets a SpecError with kind, line, column, caret and a fix.

The table doubles as the catalogue of syntax and schema errors people actually make.
"""
import pytest

from slimfx import SpecError, parse
from slimfx.dsl.errors import ERROR_KINDS


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as e:
        parse(text)
    return e.value


def body(rule: str) -> str:
    return "policy p {\n    " + rule + "\n}\n"


# (source, kind, line, column, fragments of the message, fragment of the hint or None)
CASES = [
    (body("quantise blocks int4"), "unknown-keyword", 2, 5, ["expected a rule", "got `quantise`"], "did you mean `quantize`?"),
    (body("quantize blocks int3"), "unknown-keyword", 2, 21, ["expected a bit format such as `int8` or `int4`",
                                                            "after `quantize <selector>`", "got `int3`"], "`int8`"),
    (body("quantize blocks group=64"), "syntax", 2, 21, ["expected a bit format", "got `group`"], None),
    (body("adapt blocks lroa"), "unknown-keyword", 2, 18, ["adapter kind"], "did you mean `lora`?"),
    (body("tokens after blocks[1] prun"), "unknown-keyword", 2, 28, ["`prune` or `merge`"], "did you mean `prune`?"),
    ("polciy p {\n}\n", "unknown-keyword", 1, 1, ["expected `policy`"], "did you mean `policy`?"),
    ("quantize head int8\n", "syntax", 1, 1, ["rule outside a policy"], "policy NAME {"),
    (body("quantize head int8 keep embed"), "syntax", 2, 29, ["follows `keep` on the same line"], "one rule per line"),
    ("policy p {\n    keep head\n", "syntax", 2, 14, ["ends inside policy `p`"], "close the block with `}`"),
    (body("keep model.layers.3"), "syntax", 2, 23, ["a number after `.`"], "`model.layers[3]`"),
    # `3.` lexes as one number: the hint once fired only with the number last
    (body("quantize model.layers.3.mlp.down_proj int4"), "syntax", 2, 27, ["a number after `.`"],
     "index with brackets: `model.layers[3].mlp.down_proj`"),
    (body("adapt blocks.3.5 lora"), "syntax", 2, 18, ["a number after `.`"], "`name[3]`"),  # no one fix to show
    (body("quantize head @ int8"), "syntax", 2, 19, ["got `@`"], None),
    (body("keep head\x00"), "syntax", 2, 14, ["U+0000"], None),
    # a number running into letters was "`x10` has no value; write `x10=<value>`"
    (body("adapt blocks lora rank=0x10"), "syntax", 2, 28, ["`0x10` is not a number"], "write a decimal number"),
    (body("adapt blocks lora alpha=1_000"), "syntax", 2, 29, ["`1_000` is not a number"], None),
    # the next parameter running into a value: "`1e` is not a number"
    (body("adapt blocks lora alpha=1e-3rank=4"), "syntax", 2, 29, ["`1e-3rank` is not a number"],
     "put a space between `1e-3` and `rank=`"),
    # a budget's bound running into `by` was read as `5 by`, silently
    (body("precision head choose {int8, int4} budget avg_bits<=5by fisher"), "syntax", 2, 57,
     ["`5by` is not a number"], "put a space between `5` and `by`"),
    (body("precision head choose {int8, int4} budget bytes<=40by fisher"), "syntax", 2, 54,
     ["`40by` is not a number"], "put a space between `40` and `by`"),
    # a unit after a value of `=` is no unit (it said "`B` has no value"); after `<=` the grammar names the units
    (body("quantize head int8 group=64B"), "syntax", 2, 30, ["`64B` is not a number"], "write a decimal number"),
    # a unit misspelt in case is suggested (it got none)
    (body("precision head choose {int8, int4} budget bytes<=40mb by fisher"), "unknown-keyword", 2, 56,
     ["expected a size unit (B, KB, MB, GB, KiB, MiB, GiB) or `by`", "got `mb`"], "did you mean `MB`?"),
    # an unknown escape was kept, printed as a warning or refused, by the warnings filter in force
    (body('adapt blocks lora from="C:\\models\\lora"'), "syntax", 2, 28, ["a string with a bad escape", "'\\m'"],
     "or `/` in a path"),
    # a line break inside a rule or before `{`: "got the character '\n' (U+000A)", no hint
    ("policy p\n{\n    keep head\n}\n", "syntax", 1, 9, ["expected `{`", "got the end of the line"],
     "stay on one line"),
    (body("precision blocks choose {int8, int4}\n        budget avg_bits<=5 by output_mse"), "missing-value", 2, 41,
     ["ends before its required part", "`budget`"], "`budget …` on line 3 belongs on this one"),
    (body('adapt blocks lora from="a\\9"'), "syntax", 2, 28, ["a string with a bad escape", "'\\9'"], None),
    # an octal escape past \377 was read as 'ǿ' or refused, by the warnings filter in force
    (body('adapt blocks lora from="a\\777"'), "syntax", 2, 28, ["a string with a bad escape", "octal", "'\\777'"],
     None),
    # a case-only misspelling had no suggestion
    # a keyword differing only in case is the one suggestion ("`int8` or `int4` or `int2`" before)
    (body("quantize head INT8"), "unknown-keyword", 2, 19, ["got `INT8`"], "did you mean `int8`?"),
    (body("adapt blocks LoRA"), "unknown-keyword", 2, 18, ["got `LoRA`"], "did you mean `lora`?"),
    # schema
    (body("adapt blocks lora rnak=16"), "unknown-parameter", 2, 23, ["takes no parameter `rnak`", "`rank`, `alpha`"],
     "did you mean `rank`?"),
    (body("tokens after blocks[1] prune ratio=0.5"), "unknown-parameter", 2, 34, ["`ratio`"], "tokens … merge"),
    (body("adapt blocks lora rank=0"), "out-of-range", 2, 23, ["`rank=0` is out of range", "an integer ≥ 1"],
     "write `rank=1`"),
    (body("adapt blocks lora rank=2.5"), "wrong-type", 2, 23, ["`rank` takes an integer, not 2.5"], "`rank=8`"),
    (body("adapt blocks lora merge=yes"), "wrong-type", 2, 23, ["`merge` takes true or false"], None),
    (body("tokens after blocks[1] prune keep=1.5"), "out-of-range", 2, 34, ["a number in (0, 1]"], None),
    # the valid values nearest an integer out of range are the hint (it described the parameter)
    (body("quantize head int4 group=48"), "out-of-range", 2, 24, ["a power of two, at least 16"],
     "write `group=32` or `group=64`"),
    (body("quantize head int4 group=8"), "out-of-range", 2, 24, ["a power of two, at least 16"], "write `group=16`"),
    (body("quantize head int8 method=gtpq"), "unknown-keyword", 2, 24, ["one of rtn, gptq"], "did you mean `gptq`?"),
    (body("quantize head fp16 group=64"), "invalid-combination", 2, 24, ["integer formats only"], None),
    (body("quantize head bf16 zero=float"), "invalid-combination", 2, 24, ["`zero` applies to integer formats only"],
     None),
    # options that change nothing on this rule: they passed check and compiled to the same model
    (body("quantize head fp16 clip=mse"), "invalid-combination", 2, 24, ["`clip` applies to integer formats only"],
     None),
    (body("quantize head bf16 sequential=false"), "invalid-combination", 2, 24, ["`sequential` applies to integer"],
     None),
    (body("quantize head int4 act_order=true"), "invalid-combination", 2, 24,
     ["`act_order` orders GPTQ's columns", "does not use GPTQ"], "write `method=gptq`"),
    (body("quantize head int4 method=rtn damp=0.9"), "invalid-combination", 2, 35, ["`damp`", "does not use GPTQ"],
     "write `method=gptq`"),
    (body("precision head choose {int8, int4} budget avg_bits<=5 by output_mse sequential=false"),
     "invalid-combination", 2, 73, ["`sequential` calibrates GPTQ block by block", "does not use GPTQ"], None),
    (body("quantize head int4 zero=float"), "invalid-combination", 2, 24,
     ["`zero=float`", "asymmetric", "sym=true is the default"], "add `sym=false`"),
    (body("quantize head int4 sym=true zero=float"), "invalid-combination", 2, 33, ["`zero=float`", "symmetric"],
     "write `sym=false`"),
    (body("precision head choose {int8, int4 group=32 zero=float} budget avg_bits<=5 by output_mse"),
     "invalid-combination", 2, 48, ["`zero=float`"], "add `sym=false`"),
    (body("quantize head int4 sym=false zero=half"), "out-of-range", 2, 34, ["one of int, float"], None),
    (body("adapt blocks lora dtype=int8"), "out-of-range", 2, 23, ["`dtype` is one of fp32, fp16, bf16"], None),
    (body("adapt blocks lora dtype=bf61"), "unknown-keyword", 2, 23, ["one of fp32, fp16, bf16"],
     "did you mean `bf16`?"),
    (body("adapt blocks lora rank=4 rank=8"), "duplicate", 2, 30, ["given twice"], None),
    (body("drop blocks auto(ratio=0.2, count=2)"), "invalid-combination", 2, 17, ["not both"], None),
    (body('adapt blocks lora from="a" init=gaussian'), "invalid-combination", 2, 32, ["loads a trained one"], "remove `init`"),
    (body("quantize blocks int2\n    adapt blocks lora init=error merge=true"), "invalid-combination", 3, 34,
     ["packed weights cannot take"], "write `merge=false` (the default): the adapter stays beside the quantized "
     "weight, trainable"),
    (body("collapse blocks auto(ratio=0.2, count=2)"), "invalid-combination", 2, 21, ["not both"], None),
    (body("drop blocks auto(score=influence, max_run=2)"), "invalid-combination", 2, 39,
     ["`max_run` applies to `score=angular` only", "`score=influence`"], "write `score=angular`"),
    (body("drop blocks auto(max_run=2)"), "invalid-combination", 2, 22, ["`score=influence`"], None),  # the default
    (body("drop blocks auto(score=angular, max_run=0)"), "out-of-range", 2, 37, ["an integer ≥ 1"], None),
    (body("collapse blocks auto(max_run=2)"), "unknown-parameter", 2, 26, ["`max_run`"], "auto(…) of `drop`"),
    # heal
    (body("heal"), "missing-value", 2, 5, ["`heal` needs a `method`"],
     "`heal method=linear` (training-free, seconds) or `heal method=lora`"),
    (body("heal steps=10"), "missing-value", 2, 5, ["needs a `method`"], None),
    (body("heal method=lroa"), "unknown-keyword", 2, 10, ["one of linear, lora"], "did you mean `lora`?"),
    (body("heal method=linear steps=200"), "invalid-combination", 2, 24,
     ["`steps` applies to `heal method=lora` only, not `method=linear`"], "`method=lora`"),
    (body("heal method=linear distill=true"), "invalid-combination", 2, 24, ["`distill` applies to `heal method=lora`"],
     None),
    (body("heal method=lora fold=true"), "invalid-combination", 2, 22,
     ["`fold` applies to `heal method=linear` only, not `method=lora`"], "`method=linear`"),
    (body("heal method=lora lr=0"), "out-of-range", 2, 22, ["a number > 0"], None),
    (body("heal method=lora schedule=cosin"), "unknown-keyword", 2, 22, ["`schedule` is one of constant, cosine"],
     "did you mean `cosine`?"),
    (body("heal method=lora schedule=linear"), "out-of-range", 2, 22, ["`schedule` is one of constant, cosine"], None),
    (body("heal method=linear schedule=cosine"), "invalid-combination", 2, 24,
     ["`schedule` applies to `heal method=lora` only"], "`method=lora`"),
    (body("heal method=lora rank=0"), "out-of-range", 2, 22, ["an integer ≥ 1"], None),
    (body("heal method=lora alpha=16"), "unknown-parameter", 2, 22, ["`heal` takes no parameter `alpha`"], "`adapt`"),
    (body("heal blocks[3] method=linear"), "syntax", 2, 10, ["`heal` takes no selector"], "`heal method=linear`"),
    (body("heall method=linear"), "unknown-keyword", 2, 5, ["expected a rule", "got `heall`"], "did you mean `heal`?"),
    (body("dropout blocks[1]"), "unknown-keyword", 2, 5, ["got `dropout`"], "did you mean `drop`?"),
    # a keyword at the start of a longer word is not split off it: the word is reported whole
    (body("quantize head int8group=64"), "unknown-keyword", 2, 19,
     ["expected a bit format such as `int8` or `int4` or more of the selector (`.`, `[`, `:`) after "
      "`quantize <selector>`", "got `int8group`"],
     "did you mean `int8`?"),
    (body("quantize head int8s"), "unknown-keyword", 2, 19, ["got `int8s`"], "`int8`"),
    (body("adapt head lorax"), "unknown-keyword", 2, 16, ["an adapter kind", "got `lorax`"], "did you mean `lora`"),
    (body("tokens after blocks[1] prunex keep=0.5"), "unknown-keyword", 2, 28, ["got `prunex`"],
     "did you mean `prune`?"),
    (body("precision head choose {int8x, int4} budget avg_bits<=5 by fisher"), "unknown-keyword", 2, 28,
     ["got `int8x`"], "`int8`"),
    (body("precision head choose {int8, int4} budget bytes<=40MBx by fisher"), "unknown-keyword", 2, 56,
     ["a size unit", "got `MBx`"], "`MB`"),
    ("policyp {\n}\n", "unknown-keyword", 1, 1, ["expected `policy`", "got `policyp`"], "did you mean `policy`?"),
    # tokens unpad
    (body("tokens unpad blocks[1]"), "syntax", 2, 18, ["`tokens unpad` takes no selector"],
     "above the first `tokens after` rule"),
    (body("tokens unpad blocks"), "syntax", 2, 18, ["`tokens unpad` takes no selector"], None),
    (body("tokens unpad *.attn"), "syntax", 2, 18, ["`tokens unpad` takes no selector"], None),
    (body("tokens unpad x=1"), "unknown-parameter", 2, 18,
     ["`tokens unpad` takes no parameter `x`", "(it takes no parameters)"], None),
    (body("tokens unpad keep=0.5"), "unknown-parameter", 2, 18, ["takes no parameter `keep`"], "tokens … prune"),
    (body("tokens unpad x="), "missing-value", 2, 20, ["`x` has no value"], "write `x=<value>`"),
    # a rule's line that ends where the rule needs more
    (body("quantize head"), "missing-value", 2, 18,
     ["the `quantize` rule ends before its required part: expected a bit format"], None),
    (body("adapt head lora rank"), "missing-value", 2, 25, ["`rank` has no value"], "write `rank=<value>`"),
    (body("precision head choose {int8, int4}"), "missing-value", 2, 39, ["expected `budget`"], None),
    (body("tokens after blocks[1]"), "missing-value", 2, 27, ["expected a token action"], None),
    ("policy p {\n    adapt head lora rank", "missing-value", 2, 25, ["`rank` has no value"], None),  # the file's end
    ("policy p {\n    quantize head int8 group=", "missing-value", 2, 30, ["`group` has no value"], None),
    (body("tokens unpadd"), "unknown-keyword", 2, 12, ["expected `after` or `unpad` after `tokens`", "got `unpadd`"],
     "did you mean `unpad`?"),
    (body("tokens afterr blocks[1] prune"), "unknown-keyword", 2, 12, ["got `afterr`"], "did you mean `after`?"),
    (body("tokens blocks[1] prune"), "syntax", 2, 12, ["expected `after` or `unpad` after `tokens`, got `blocks`"], None),
    (body("keep head[::0]"), "out-of-range", 2, 10, ["step cannot be zero"], None),
    (body("keep head rank=3"), "unknown-parameter", 2, 15, ["`keep` takes no parameter"], "`adapt`"),
    (body("precision blocks choose {int8, int8} budget avg_bits<=8 by output_mse"), "duplicate", 2, 36,
     ["listed twice"], None),
    # the same candidate written with a default spelled out: the solver weighed it twice
    (body("precision blocks choose {int4, int4 group=64} budget avg_bits<=8 by output_mse"), "duplicate", 2, 36,
     ["`int4 group=64` is listed twice", "(as `int4`, the same format with its defaults)"], None),
    (body("precision blocks choose {int8 sym=true zero=int, int8} budget avg_bits<=8 by output_mse"), "duplicate",
     2, 54, ["`int8` is listed twice"], None),
    (body("precision blocks choose {int8, int4} budget avg_bits<=2 by output_mse"), "out-of-range", 2, 42,
     ["below the smallest format offered (4 bits)"], None),
    (body("precision blocks choose {int8} budget avg_bits<=8 by output_mae"), "unknown-keyword", 2, 58,
     ["metric `output_mae`"], "did you mean `output_mse`?"),
    (body("precision head choose {int8, int4} budget avg_bits<=5  by\tmse"), "unknown-keyword", 2, 63,
     ["metric `mse`", "(known: output_mse, fisher)"], "did you mean `output_mse`?"),
    (body("precision head choose {int8, int4} budget bytes<=1e400 by output_mse"), "out-of-range", 2, 40,
     ["a byte budget must be a finite size"], "`budget bytes<=64GiB`"),
    (body("precision head choose {int8, int4} budget bytes<=1e308GiB by output_mse"), "out-of-range", 2, 40,
     ["finite size"], None),
    # strings `fmt` could not write back (a raw NUL, a surrogate escape) are refused at the string
    (body('adapt head lora from="\\x00"'), "syntax", 2, 26, ["a string holding a control character (\\x00)"],
     "remove it"),
    (body('adapt head lora from="a\x1bb"'), "syntax", 2, 26, ["a control character (\\x1b)"], None),
    (body('adapt head lora from="\\ud800"'), "syntax", 2, 26, ["a string holding a surrogate (\\ud800)"], None),
    (body('adapt head lora from="a\x00"'), "syntax", 2, 26, ["a control character (\\x00)"], None),
    (body('adapt head lora from="C:\\xdir"'), "syntax", 2, 26, ["a string with a bad escape", "\\xXX"],
     "`\\\\` for a backslash"),
    # the first brace past the limit at any depth (it was the innermost node too deep, which moved with it)
    (body("keep " + "{" * 40 + "a" + "}" * 40), "too-deep", 2, 42, ["nested deeper than 32"], None),
    (body("keep blocks." + "{a," * 100 + "b" + "}" * 100), "too-deep", 2, 113, ["nested deeper than 32"], None),
    (body("keep " + "{" * 600 + "a" + "}" * 600), "too-deep", 2, 42, ["nested deeper than 32"], None),
    # braces in a comment or a string above it were counted: the error pointed into them
    ("# " + "{" * 40 + "\n" + body("keep " + "{" * 600 + "a" + "}" * 600), "too-deep", 3, 42,
     ["nested deeper than 32"], None),
    (body('adapt x lora from="' + "{" * 40 + '\\"{"\n    keep ' + "{" * 600 + "a" + "}" * 600), "too-deep", 3, 42,
     ["nested deeper than 32"], None),
]


@pytest.mark.parametrize("source, kind, line, column, fragments, hint", CASES,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_error_table(source, kind, line, column, fragments, hint):
    err = error_of(source)
    assert err.kind == kind, str(err)
    assert err.line == line, str(err)
    if column:
        assert err.column == column, str(err)
    for fragment in fragments:
        assert fragment in err.message, str(err)
    if hint:
        assert err.hint and hint in err.hint, str(err)
    assert err.kind in ERROR_KINDS


def test_rendering_has_location_source_line_and_caret():
    err = error_of(body("adapt blocks lora rnak=16"))
    lines = str(err).splitlines()
    assert lines[0].startswith("<policy>:2:23: error[unknown-parameter]:")
    assert lines[1] == "        adapt blocks lora rnak=16"
    assert lines[2] == " " * 26 + "^^^^"
    assert lines[3] == "  = did you mean `rank`?"
    assert err.source_line == "    adapt blocks lora rnak=16"


def test_all_schema_problems_of_a_file_come_together():
    err = error_of("policy p {\n  adapt a lora rank=0\n  quantize b int4 group=3\n}\n")
    assert [(d.kind, d.line) for d in err.diagnostics] == [("out-of-range", 2), ("out-of-range", 3)]
    assert str(err).count("error[") == 2


def test_filename_appears_in_the_message():
    with pytest.raises(SpecError, match=r"^my\.slim:1:1:"):
        parse("quantize x int8", filename="my.slim")


def test_long_lines_are_cut_around_the_caret():
    err = error_of(body("keep " + "a." * 200 + "@"))
    shown, caret = str(err).splitlines()[1:3]
    assert len(shown) < 120 and "…" in shown
    assert shown[caret.index("^")] == "@"


def test_a_selector_continuation_the_parser_refuses_is_not_listed_as_expected():
    """`quantize *[0] int8` was refused at `[` by a message that listed `[` among what it expected."""
    with pytest.raises(SpecError) as info:
        parse("quantize *[0] int8", bare=True)
    first = str(info.value).splitlines()[0]
    assert "more of the selector (`.`, `:`)" in first and first.endswith("got `[`")


@pytest.mark.parametrize("rule, listed", [
    ("quantize * ,", "a bit format such as `int8` or `int4` or more of the selector (`:`)"),
    ("quantize {blocks[1], } int4", "`{`, a name, `*` or `**`"),
])
def test_only_what_the_parser_takes_next_is_listed(rule, listed):
    """LALR's merged look-ahead sets listed, after `quantize *`, a name, `}` and the end of the line
    (which a `*` inside a `{…}` set takes), each refused if written there."""
    with pytest.raises(SpecError) as info:
        parse(rule, bare=True)
    first = str(info.value).splitlines()[0]
    assert f"expected {listed} after `quantize <selector>`" in first, first


def test_the_caret_stands_under_its_place_after_wide_characters():
    """A wide character takes two terminal cells: the caret sat 4 cells left of `rank=0`."""
    with pytest.raises(SpecError) as e:
        parse('adapt x lora from="漢字漢字" rank=0', bare=True)
    text, caret = str(e.value).splitlines()[1:3]
    assert caret.index("^") == text.index("rank") + 4 and caret.count("^") == len("rank=0")
    with pytest.raises(SpecError) as e:
        parse('adapt 漢字 lora rank=0', bare=True)
    text, caret = str(e.value).splitlines()[1:3]
    assert caret == " " * text.index("漢") + "^^"  # one wide character: two cells


@pytest.mark.parametrize("text, shown", [("quantize head\x1b[31m int8", "quantize head␛[31m int8"),
                                         ("quantize\rhead int8", "quantize␍head int8"),
                                         ("quantize head\x7f int8", "quantize head␡ int8")])
def test_control_characters_in_the_echoed_line_are_shown_not_sent_to_the_terminal(text, shown):
    """An escape sequence in a policy file restyled the terminal, and a stray CR moved the rest of
    the line over its start; each now takes one cell, so the caret stays under its place."""
    with pytest.raises(SpecError) as e:
        parse(text, bare=True)
    line, caret = str(e.value).splitlines()[1:3]
    assert line == "    " + shown and caret.index("^") == e.value.column + 3
    assert not any(ord(c) < 0x20 or c == "\x7f" for c in str(e.value).replace("\n", ""))


def test_past_fifty_problems_the_rest_are_counted_not_printed():
    """20,000 copies of one rule printed 80,000 lines (`slimfx check`); the first 50 are shown
    and the rest counted by kind. `.diagnostics` still holds every one."""
    from slimfx.dsl.errors import MAX_RENDERED

    text = "policy p {\n" + "    keep head\n" * 120 + "    heal method=linear\n" * 2 + "}\n"
    with pytest.raises(SpecError) as info:
        parse(text, filename="dup.slim")
    err = info.value
    assert len(err.diagnostics) == 121 and MAX_RENDERED == 50
    rendered = str(err)
    assert rendered.count("error[duplicate]") == 50 and "dup.slim:52:5" in rendered and "dup.slim:53:5" not in rendered
    assert rendered.endswith("dup.slim: … and 71 more not shown (69 duplicate, 2 illegal-order): fix the problems "
                             "above and run it again to see the rest")
    few = SpecError(err.diagnostics[:MAX_RENDERED], text, "dup.slim")
    assert "not shown" not in str(few) and str(few).count("error[duplicate]") == 50
