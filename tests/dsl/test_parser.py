"""parse(): text -> AST, for every rule kind and selector form."""
import pytest

from slimfx import SpecError, parse
from slimfx.dsl import ast as A
from slimfx.dsl.printer import format_selector


def rules(text: str):
    return parse("policy p {\n" + text + "\n}").policy("p").rules


def only(text: str):
    (rule,) = rules(text)
    return rule


def test_empty_text_is_an_empty_spec():
    assert parse("") == A.Spec(())
    assert parse("\n  # only a comment\n") == A.Spec(())


def test_several_policies_share_a_file():
    spec = parse("policy a {\n keep head\n}\n\npolicy b {\n keep embed\n}\n")
    assert [p.name for p in spec.policies] == ["a", "b"]
    with pytest.raises(ValueError, match="a, b"):
        spec.policy()
    with pytest.raises(KeyError, match="no policy `c`"):
        spec.policy("c")


def test_collapse_auto_with_typed_params():
    rule = only("collapse blocks auto(ratio=0.25, threshold=1) method=laco")
    assert isinstance(rule, A.Collapse)
    assert rule.auto.get("ratio") == 0.25
    assert rule.auto.get("threshold") == 1.0 and type(rule.auto.get("threshold")) is float
    assert rule.auto.get("span") == 4  # schema default
    assert rule.get("method") == "laco"


def test_drop_explicit_and_auto():
    assert only("drop blocks[-4:-1]").selector.path.segments[0] == A.Name("blocks", A.Slice(-4, -1))
    assert only("drop blocks auto(count=3)").auto.get("count") == 3


def test_auto_takes_count_or_ratio_and_neither_means_a_quarter():
    # Consumers read `count` first and fall back to `ratio`, whose default is 0.25.
    for keyword in ("collapse", "drop"):
        auto = only(f"{keyword} blocks auto()").auto
        assert (auto.get("count"), auto.get("ratio")) == (None, 0.25)
        assert only(f"{keyword} blocks auto(count=2)").auto.get("count") == 2
    assert only("drop blocks auto(score=influence)").auto.get("ratio") == 0.25


def test_drop_auto_angular_score_with_max_run():
    auto = only("drop blocks auto(score=angular, max_run=3)").auto
    assert (auto.get("score"), auto.get("max_run")) == ("angular", 3)
    assert only("drop blocks auto(score=angular)").auto.get("max_run") == 4  # schema default


def test_heal_has_no_selector_and_typed_params():
    drop, linear, lora = rules("drop blocks[2]\nheal method=linear fold=true\n"
                               "heal distill=true steps=200 method=lora lr=3e-4")
    assert isinstance(linear, A.Heal) and linear.selector is None
    assert (linear.method, linear.get("fold")) == ("linear", True)
    assert [p.name for p in lora.params] == ["method", "steps", "lr", "distill"]  # schema order
    assert (lora.method, lora.get("steps"), lora.get("lr"), lora.get("distill")) == ("lora", 200, 3e-4, True)
    assert (lora.get("rank"), lora.get("merge"), lora.get("fold")) == (8, True, False)  # defaults
    assert (lora.span.line, lora.span.column, lora.params[0].span.column) == (4, 1, 29)  # line 1 is `policy`


def test_adapt_params_are_kept_in_schema_order():
    a = only("adapt blocks.*.attn.q lora alpha=32 rank=16")
    b = only("adapt blocks.*.attn.q lora rank=16 alpha=32.0")
    assert a == b
    assert [p.name for p in a.params] == ["rank", "alpha"]
    assert a.method == "lora" and a.get("merge") is False and a.get("dtype") == "fp32"
    c = only("adapt blocks.*.attn.q lora merge=true dtype=fp16 init=gaussian rank=4")
    assert [p.name for p in c.params] == ["rank", "init", "dtype", "merge"] and c.get("dtype") == "fp16"


def test_quantize_and_formats():
    q = only("quantize blocks.*.** : Linear int4 group=64 sym=false method=gptq")
    assert (q.format, q.get("group"), q.get("sym"), q.get("method")) == ("int4", 64, False, "gptq")
    assert only("quantize head fp16").format == "fp16"
    assert only("quantize head int4").get("zero") == "int"  # the default: a whole zero point
    z = only("quantize head int4 group=32 zero=float sym=false")
    assert (z.get("sym"), z.get("zero")) == (False, "float")
    assert [p.name for p in z.params] == ["group", "sym", "zero"]  # schema order


def test_zero_float_in_a_choose():
    p = only("precision head choose {int4 group=32 sym=false zero=float, int4 group=32 sym=false} "
             "budget avg_bits<=5 by output_mse")
    assert [c.get("zero") for c in p.choices] == ["float", "int"]


def test_precision_choose_budget_by():
    p = only("precision blocks.*.** : Linear choose {int8, int4 group=32} budget avg_bits<=4.5 by output_mse")
    assert [c.format for c in p.choices] == ["int8", "int4"]
    assert p.choices[1].get("group") == 32
    assert p.budget == A.Budget("avg_bits", 4.5)
    b = only("precision blocks choose {int8, int4} budget bytes<=64MiB by output_mse").budget
    assert (b.metric, b.limit, b.unit, b.limit_value) == ("bytes", 64, "MiB", 64 * 2**20)


def test_tokens_prune_and_merge_keep_is_a_parameter_name_here():
    prune, merge = rules("tokens after blocks[1] prune keep=0.5 score=norm\ntokens after blocks[3] merge ratio=0.25")
    assert (prune.action, prune.get("keep"), prune.get("score")) == ("prune", 0.5, "norm")
    assert (merge.action, merge.get("ratio")) == ("merge", 0.25)


def test_tokens_unpad_has_no_selector_and_no_params():
    unpad, prune = rules("tokens   unpad\ntokens after blocks[1] prune")
    assert type(unpad) is A.Unpad and not isinstance(unpad, A.Tokens)
    assert (unpad.kind, unpad.selector, unpad.action, unpad.params) == ("tokens", None, "unpad", ())
    assert (unpad.span.line, unpad.span.column, unpad.span.end_column) == (2, 1, 15)  # line 1 is `policy`
    assert type(prune) is A.Tokens and prune.action == "prune"
    assert A.Unpad in A.RULE_TYPES and "Unpad" in A.__all__


def test_unpad_is_a_class_attribute_not_a_field():
    import dataclasses

    assert [f.name for f in dataclasses.fields(A.Unpad)] == ["params", "span", "trivia"]
    assert A.Unpad() == only("tokens unpad") and A.Unpad().selector is None


@pytest.mark.parametrize("selector", ["unpad", "blocks[0].unpad", "unpad.after", "model.unpad[2].tokens"])
def test_unpad_is_reserved_only_right_after_tokens(selector):
    for rule in (f"keep {selector}", f"tokens after {selector} merge", f"adapt {selector} lora"):
        assert format_selector(only(rule).selector) == selector
    spec = parse("policy unpad {\n    tokens unpad\n}")  # a policy may be called `unpad` too
    assert spec.policy("unpad").rules == (A.Unpad(),)


def test_keep():
    assert isinstance(only("keep embed"), A.Keep)


@pytest.mark.parametrize("text, segments, class_filter", [
    ("blocks", (A.Name("blocks"),), None),
    ("blocks[3]", (A.Name("blocks", A.Item(3)),), None),
    ("blocks[-2:]", (A.Name("blocks", A.Slice(-2, None)),), None),
    ("blocks[::2]", (A.Name("blocks", A.Slice(None, None, 2)),), None),
    ("blocks[1:7:-2]", (A.Name("blocks", A.Slice(1, 7, -2)),), None),
    ("blocks.*.**", (A.Name("blocks"), A.Star(), A.GlobStar()), None),
    ("** : Linear", (A.GlobStar(),), "Linear"),
    ("model.layers[3].self_attn.q_proj",
     (A.Name("model"), A.Name("layers", A.Item(3)), A.Name("self_attn"), A.Name("q_proj")), None),
    ("blocks.*.{attn.q, mlp.down}", (A.Name("blocks"), A.Star(), A.Alternatives((
        A.Path((A.Name("attn"), A.Name("q"))), A.Path((A.Name("mlp"), A.Name("down")))))), None),
    ("model.keep.int8", (A.Name("model"), A.Name("keep"), A.Name("int8")), None),  # keywords as names
])
def test_selector_forms(text, segments, class_filter):
    sel = only(f"keep {text}").selector
    assert sel.path.segments == segments
    assert sel.class_filter == class_filter


def test_positions_point_into_the_source():
    rule = parse("policy p {\n    adapt blocks.*.attn.q lora rank=4\n}").policies[0].rules[0]
    assert (rule.span.line, rule.span.column) == (2, 5)
    assert (rule.selector.span.line, rule.selector.span.column) == (2, 11)
    assert (rule.params[0].span.line, rule.params[0].span.column) == (2, 32)


def test_string_values_and_bytes_input_and_bom():
    spec = parse("\ufeffpolicy p {\n keep head\n}".encode())
    assert spec.policy("p").rules[0] == A.Keep(A.Selector(A.Path((A.Name("head"),))))
    with pytest.raises(SpecError) as e:
        parse(b"policy p {\n keep head \xff\n}")
    assert e.value.kind == "encoding" and (e.value.line, e.value.column) == (2, 12)


@pytest.mark.parametrize("data, column, shown", [
    (b"\xef\xbb\xbfkeep \xff", 6, "keep \ufffd"),  # the BOM is no column
    ("keep é".encode() + b"\xff", 7, "keep é\ufffd"),  # "é" is one column, not two bytes
])
def test_a_byte_that_is_not_utf8_is_shown_at_its_character_column(data, column, shown):
    """The column counted bytes (the BOM's and each of "é"'s) and the line above the caret was empty."""
    with pytest.raises(SpecError) as e:
        parse(data)
    assert (e.value.line, e.value.column) == (1, column) and e.value.source_line == shown


def test_only_text_or_bytes():
    with pytest.raises(SpecError, match="text or bytes"):
        parse(42)


def test_comments_and_crlf_do_not_change_meaning():
    plain = parse("policy p {\n keep head\n quantize embed int8\n}")
    noisy = parse("# top\r\npolicy p {  # header\r\n\r\n keep head # why\r\n # lead\r\n quantize embed int8\r\n}\r\n")
    assert plain == noisy


def test_parse_file_reads_and_reports_unreadable(tmp_path):
    from slimfx import parse_file

    f = tmp_path / "x.slim"
    f.write_text("policy p {\n keep head\n}\n")
    assert parse_file(f).filename == str(f)
    with pytest.raises(SpecError, match="cannot read"):
        parse_file(tmp_path / "missing.slim")


@pytest.mark.parametrize("rule, column", [
    ("adapt head lora rank={n}", 26), ("keep blocks[{n}]", 17), ("keep blocks[{n}:]", 17), ("keep blocks[::{n}]", 19),
    ("precision head choose {{int8, int4}} budget avg_bits<={n} by output_mse", 57),
])
def test_an_integer_of_thousands_of_digits_is_out_of_range_at_its_token(rule, column):
    """Python reads no integer of more than 4300 digits: a ValueError inside lark, "a bug in slimfx"."""
    with pytest.raises(SpecError) as e:
        parse("policy p {\n    " + rule.format(n="1" * 5000) + "\n}\n")
    assert e.value.kind == "out-of-range" and (e.value.line, e.value.column) == (2, column)
    assert "a number of 5000 digits is too large" in e.value.message and e.value.diagnostics[0].width == 5000


@pytest.mark.parametrize("path", [99, 0, None])
def test_parse_file_takes_a_path_not_a_file_descriptor(path):
    """open() reads an int as a file descriptor: parse_file(0) read standard input, and 99 failed
    with a TypeError from inside the no-file message."""
    from slimfx import parse_file

    with pytest.raises(TypeError, match=r"parse_file takes a path \(a str, bytes or os.PathLike\), not the"):
        parse_file(path)


def test_parse_file_takes_a_path_in_bytes(tmp_path):
    from slimfx import parse_file

    (tmp_path / "p.slim").write_text("policy p {\n    keep head\n}\n")
    assert parse_file(bytes(tmp_path / "p.slim")).policy("p").name == "p"
