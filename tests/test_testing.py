"""The hypothesis strategies slimfx ships: what they draw is valid, varied, and round-trips."""
import pytest
from hypothesis import Phase, find, given, settings, strategies as st

from slimfx import parse
from slimfx.dsl import ast as A
from slimfx.testing import (_params_text, bare_rules, grammar_text_strategy, param_values, policies, policy_asts,
                            tiny_models)
from slimfx.dsl.schema import SCHEMAS

# Searches for a rare draw: generate only — shrinking the example found took most of the time
# (46 s of one search) and checks nothing.
_FIND = settings(max_examples=2000, database=None, derandomize=True, deadline=None, phases=[Phase.generate])


@given(policies())
def test_policies_are_valid_text(text):
    # one policy at least: `slimfx check` refuses a text of comments alone ("holds no policy"),
    # one draw in eight before
    assert isinstance(parse(text), A.Spec) and parse(text).policies


@given(bare_rules())
def test_bare_rules_parse_as_the_one_policy_they_came_from(text):
    from slimfx.dsl.printer import format_rule

    spec = parse(text, bare=True)
    assert len(spec.policies) == 1
    wrapped = parse("policy p {\n" + text + "\n}\n")
    assert [format_rule(r) for r in spec.policies[0].rules] == [format_rule(r) for r in wrapped.policies[0].rules]


def test_bare_rules_are_drawn_with_rules_and_without():
    """Not only the empty text a policy with no rules gives."""
    assert find(bare_rules(), lambda t: t.count("\n") >= 3, settings=_FIND)
    assert find(bare_rules(), lambda t: t == "", settings=_FIND) == ""


def test_bare_rules_are_seldom_empty():
    """A third of the draws were the empty text (the grammar draws no rules for a third of first
    policies): a user's property test spent that share of its examples on one input."""
    counts = []

    @settings(max_examples=200, database=None, derandomize=True, deadline=None)
    @given(bare_rules())
    def collect(text):
        counts.append(len(parse(text, bare=True).policies[0].rules))

    collect()
    assert sum(n == 0 for n in counts) <= 0.08 * len(counts), counts


@given(policy_asts())
def test_policy_asts_are_specs(spec):
    assert all(isinstance(p, A.Policy) for p in spec.policies)


def test_policies_cover_every_rule_kind():
    seen: set[str] = set()

    # Derandomized: a fixed run of examples, so a rare kind missing from one random run of 150
    # (precision was, once, after a new heal parameter shifted the draws) cannot fail CI by chance.
    @settings(max_examples=300, database=None, derandomize=True)
    @given(policy_asts())
    def collect(spec):
        seen.update(type(r).__name__ for p in spec.policies for r in p.rules)

    collect()
    # by class: `tokens unpad` and `tokens after` share the kind "tokens", and one missing hid
    assert seen == {"Collapse", "Drop", "Adapt", "Quantize", "Precision", "Tokens", "Unpad", "Keep", "Heal"}


def test_heal_comes_after_a_removal_with_its_own_methods_params():
    """Generated `heal` rules follow a `collapse` or `drop`, and auto(…) never mixes what validate.py
    rejects together (ratio and count; max_run without score=angular)."""
    from slimfx.dsl.schema import HEAL_METHOD_PARAMS

    methods: set[str] = set()

    @settings(max_examples=120, database=None, derandomize=True, deadline=None)
    @given(policy_asts())
    def collect(spec):
        for policy in spec.policies:
            for i, rule in enumerate(policy.rules):
                if isinstance(rule, A.Heal):
                    assert any(isinstance(r, (A.Collapse, A.Drop)) for r in policy.rules[:i])
                    assert all(HEAL_METHOD_PARAMS.get(p.name, rule.method) == rule.method for p in rule.params)
                    methods.add(rule.method)
                auto = getattr(rule, "auto", None)
                if auto is not None:
                    names = {p.name for p in auto.params}
                    assert not {"ratio", "count"} <= names
                    assert "max_run" not in names or auto.get("score") == "angular"

    collect()
    assert methods <= {"linear", "lora"}
    # Both methods are drawn (searched for, so the check does not hang on how 120 draws fall).
    for method in ("linear", "lora"):
        find(policy_asts(), lambda spec, m=method: any(isinstance(r, A.Heal) and r.method == m
                                                        for p in spec.policies for r in p.rules),
             settings=_FIND)


def test_tokens_unpad_is_drawn_once_at_most_and_above_every_tokens_after():
    seen = {"unpad": 0}

    @settings(max_examples=200, database=None, derandomize=True, deadline=None)
    @given(policy_asts())
    def collect(spec):
        for policy in spec.policies:
            types = [type(r) for r in policy.rules]
            assert types.count(A.Unpad) <= 1
            if A.Unpad in types:
                seen["unpad"] += 1
                assert A.Tokens not in types[: types.index(A.Unpad)]

    collect()
    assert seen["unpad"] >= 10, seen
    # Both orders are drawn: an unpad with a `tokens after` below it (searched for, not counted in
    # the 200 above, where it is rare enough that one more schema parameter drew none of it).
    find(policy_asts(), lambda spec: any(A.Unpad in (types := [type(r) for r in p.rules])
                                         and A.Tokens in types[types.index(A.Unpad):] for p in spec.policies),
         settings=_FIND)


@given(st.data())
def test_extra_unpads_go_and_the_first_moves_above_tokens_after(data):
    from slimfx.testing import _one_unpad_first

    text = ("policy p {\n    keep head\n    tokens after blocks[1] prune  # why\n    tokens  unpad\n"
            "    tokens unpad\n}\npolicy q {\n    tokens unpad\n    tokens after blocks[2] merge\n}\n")
    spec = parse(data.draw(_one_unpad_first(text)))
    assert [type(r) for r in spec.policy("p").rules] == [A.Keep, A.Unpad, A.Tokens]
    assert spec.policy("p").rules[2].trivia.inline == "# why"
    assert [type(r) for r in spec.policy("q").rules] == [A.Unpad, A.Tokens]  # already right: unchanged
    lone = parse(data.draw(_one_unpad_first("policy r {\n    tokens after blocks[0] prune\n}\n")))
    assert [type(r) for r in lone.policy("r").rules] in ([A.Tokens], [A.Unpad, A.Tokens])


@given(st.data())
def test_param_values_satisfy_their_schema(data):
    key = data.draw(st.sampled_from(sorted(SCHEMAS)))
    for spec in SCHEMAS[key].values():
        assert spec.valid(data.draw(param_values(spec)))


@given(grammar_text_strategy())
def test_raw_grammar_text_is_syntactically_valid(text):
    from slimfx.dsl.parser import lark_parser

    lark_parser().parse(text)


@settings(max_examples=4, deadline=None)
@given(tiny_models(archs=("llama", "bert", "vit")))
def test_tiny_models_build_and_run(loaded):
    import torch

    with torch.no_grad():
        out = loaded.model(**loaded.example_inputs)
    assert out is not None and loaded.arch in ("llama", "bert", "vit")


def test_tiny_models_refuses_unknown_archs():
    import pytest

    from slimfx.testing import tiny_models

    with pytest.raises(ValueError, match="unknown architectures"):
        tiny_models(archs=("lama",))
    with pytest.raises(TypeError, match=r"tiny_models\(archs=...\) takes an architecture name or a list of them, "
                                        r"got the int 5; known: llama"):
        tiny_models(archs=5)  # raised "'int' object is not iterable"


def test_tiny_models_takes_one_name_and_refuses_what_it_cannot_draw():
    """"llama" was read as the architectures ['a', 'l', 'm']; max_layers=1 gave hypothesis's
    "max_value=1 < min_value=2"; archs=[] "Cannot sample from a length-zero sequence"."""
    import pytest

    with pytest.raises(ValueError, match=r"archs=\[\]\) has nothing to draw"):
        tiny_models(archs=[])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_layers must be a whole number of at least 1"):
            tiny_models(max_layers=bad)


@settings(max_examples=2, deadline=None)
@given(tiny_models("llama", max_layers=1))
def test_tiny_models_of_one_name_and_one_layer(drawn):
    assert drawn.arch == "llama" and drawn.model.config.num_hidden_layers == 1


def test_check_policy_is_exported_and_loads_torch_only_on_use():
    """`from slimfx.testing import policies` stays torch-free; check_policy comes on first use
    (the checker lives in slimfx/policy_check.py; tests/test_policy_check.py tests it)."""
    import subprocess
    import sys

    code = ("import sys, slimfx.testing as t; assert 'torch' not in sys.modules; "
            "from slimfx.testing import check_policy, PolicyCheckError, PolicyCheckResult; "
            "import slimfx.policy_check as pc; assert check_policy is pc.check_policy; "
            "assert issubclass(PolicyCheckError, AssertionError); assert 'check_policy' in t.__all__")
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=60, database=None, deadline=None)
@given(st.sampled_from(["quantize", "choice"]).flatmap(lambda key: _params_text(key, 3)))
def test_drawn_format_params_never_put_zero_float_with_sym_true(text):
    """validate.py refuses zero=float on a symmetric format (sym=true is the default)."""
    assert "zero=float" not in text or "sym=false" in text


_RULE = {"quantize": "policy p {{\n    quantize a int4 {}\n}}\n",
         "choice": "policy p {{\n    precision a choose {{int4 {}}} budget avg_bits<=8 by output_mse\n}}\n"}


def test_adapter_dtypes_are_drawn_in_adapt_rules():
    for dtype in ("fp16", "bf16"):
        text = find(_params_text("adapt", 3), lambda t: f"dtype={dtype}" in t,
                    settings=_FIND)
        assert parse("policy p {{\n    quantize a int4\n    adapt a lora {}\n}}\n".format(text))


def test_zero_float_is_drawn_in_quantize_rules_and_choose_formats():
    for key in ("quantize", "choice"):
        text = find(_params_text(key, 3), lambda t: "zero=float" in t,
                    settings=_FIND)
        assert "sym=false" in text and parse(_RULE[key].format(text))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_schema_edits_make_repeated_choices_a_keep_budget_and_a_lone_heal_valid(data):
    """Each was redrawn (about 1 draw in 10 thrown away): candidates listed twice (here one more
    than there are formats), an avg_bits limit of 16–31 with `keep` (32 bits) offered, and the
    drop a lone `heal` gets written just above it, below a `quantize` (an illegal order)."""
    from slimfx.dsl.parser import lark_parser
    from slimfx.testing import _apply, _schema_edits

    raw = ("policy p {\n  quantize blocks.*.mlp.* int8\n"
           "  precision blocks.*.attn.* choose {keep, keep, int8, int8, int4, int4, int2} budget avg_bits<=20"
           " by output_mse\n  heal method=linear\n}\n")
    text = _apply(raw, data.draw(_schema_edits(lark_parser().parse(raw))))
    policy = parse(text).policies[0]
    precision = next(r for r in policy.rules if isinstance(r, A.Precision))
    formats = [c.format for c in precision.choices]
    assert len(formats) == len(set(formats)) == 6
    assert isinstance(policy.rules[0], A.Drop), "the drop goes above every rule"


def test_adapt_init_error_is_drawn_with_a_quantize_above_it():
    """check.py refuses `adapt … init=error` with no `quantize` or `precision` above it, and the
    strategy gave it none: all 1,500 draws of an audit lacked it (every draft with it was redrawn)."""
    spec = find(policy_asts(), lambda s: any(isinstance(r, A.Adapt) and r.get("init") == "error"
                                             for p in s.policies for r in p.rules), settings=_FIND)
    for p in spec.policies:
        for i, r in enumerate(p.rules):
            if isinstance(r, A.Adapt) and r.get("init") == "error":
                assert any(isinstance(q, (A.Quantize, A.Precision)) for q in p.rules[:i])


def test_a_redrawn_policy_is_named_in_hypothesis_statistics(monkeypatch):
    """policies() redraws what parse() refuses after its rewrites; unnamed, a rewrite that broke
    only shrank coverage, unseen. Each redraw is an event naming the error's kind."""
    import slimfx.testing as testing
    from hypothesis import HealthCheck
    from hypothesis.errors import Unsatisfiable

    from slimfx.dsl.errors import SpecError

    named = []
    monkeypatch.setattr(testing, "event", named.append)
    monkeypatch.setattr(testing, "parse", lambda text: (_ for _ in ()).throw(SpecError.at("illegal-order", "x")))

    @settings(max_examples=1, database=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(testing.policies())
    def draw(text):
        pass

    with pytest.raises(Unsatisfiable):
        draw()
    # and a draw with no policy at all (comments alone), before any rewrite
    assert named and set(named) <= {"policies(): redrawn, illegal-order", "policies(): redrawn, no policy"}
    assert "policies(): redrawn, illegal-order" in named
