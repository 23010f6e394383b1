"""Static cross-rule checks: illegal orders, duplicates, rules that would do nothing."""
import pytest

from slimfx import SpecError, parse


def error_of(*rules: str) -> SpecError:
    with pytest.raises(SpecError) as e:
        parse("policy p {\n" + "\n".join("    " + r for r in rules) + "\n}\n")
    return e.value


def ok(*rules: str):
    return parse("policy p {\n" + "\n".join("    " + r for r in rules) + "\n}\n")


def test_merging_an_adapter_into_quantized_weights_is_rejected_with_the_fix():
    err = error_of("quantize blocks.*.attn.q int4", "adapt blocks.*.attn.q lora merge=true")
    assert err.kind == "illegal-order" and err.line == 3
    assert "already-quantized" in err.message
    assert "above line 2" in err.hint and "merge=false" in err.hint


def test_the_same_in_the_working_orders():
    ok("adapt blocks.*.attn.q lora merge=true", "quantize blocks.*.attn.q int4")  # merge, then quantize
    ok("quantize blocks.*.attn.q int4", "adapt blocks.*.attn.q lora merge=false")  # QLoRA


def test_structural_rules_come_before_weight_rules():
    err = error_of("quantize head int8", "collapse blocks[2:4]")
    assert err.kind == "illegal-order" and "move this `collapse` rule above line 2" in err.hint
    assert error_of("adapt blocks lora", "drop blocks[1]").kind == "illegal-order"
    ok("drop blocks[1]", "adapt blocks lora")


def test_a_target_given_two_precisions_names_both_lines():
    err = error_of("quantize head int8", "precision head choose {int8, int4} budget avg_bits<=6 by output_mse")
    assert err.kind == "duplicate" and err.line == 3 and "line 2" in err.message
    assert error_of("quantize head int8", "quantize head int4").kind == "duplicate"


def test_keep_that_cancels_a_rule_is_an_error_not_a_silent_no_op():
    err = error_of("keep head", "quantize head int8")
    assert err.kind == "invalid-combination" and "would do nothing" in err.message
    ok("keep head", "quantize blocks.*.** int8")
    ok("keep blocks[1]", "tokens after blocks[1] merge")  # keep protects weights; a token step has none


def test_an_adapter_merged_first_leaves_the_linear_free_for_another():
    """What the model check advises for two adapters on one linear ("give the earlier rule
    merge=true") was refused here as a duplicate rule."""
    ok('adapt blocks.*.attn.q lora from="trained" merge=true', "adapt blocks.*.attn.q lora rank=4")
    assert error_of("adapt blocks.*.attn.q lora rank=4", "adapt blocks.*.attn.q lora rank=8").kind == "duplicate"


def test_duplicate_rules_and_policies():
    assert error_of("tokens after blocks[1] prune", "tokens after blocks[1] merge").kind == "duplicate"
    # blocks are renumbered after each removal: the same text removes another block
    ok("drop blocks[0]", "drop blocks[0]")
    ok("collapse blocks[0:2]", "collapse blocks[0:2]")
    # and so does the same text around a removal: `slimfx check` refused these as duplicates or
    # as a `keep` that cancels the `drop`, while plan and compile bind them to other blocks
    ok("drop blocks[0]", "keep blocks[0]")
    ok("keep blocks[1]", "drop blocks[0]", "keep blocks[1]")
    ok("tokens after blocks[1] prune restore=true", "drop blocks[0]", "tokens after blocks[1] merge restore=true")
    # a selector no removal moves is still compared
    assert error_of("keep head", "drop blocks[0]", "keep head").kind == "duplicate"
    assert error_of("drop blocks[0]", "quantize head int8", "quantize head int4").kind == "duplicate"
    with pytest.raises(SpecError) as e:
        parse("policy a {\n}\npolicy a {\n}\n")
    assert e.value.kind == "duplicate" and e.value.line == 3


def test_check_can_be_skipped_for_tools_that_want_the_raw_ast():
    spec = parse("policy p {\n keep head\n quantize head int8\n}", check=False)
    assert len(spec.policy("p").rules) == 2


def test_heal_needs_a_collapse_or_drop_before_it():
    err = error_of("heal method=linear", "quantize head int8")
    assert err.kind == "illegal-order" and (err.line, err.column) == (2, 5)
    assert "nothing before line 2 removes blocks" in err.message
    assert "after a `collapse` or `drop`" in err.hint
    assert error_of("quantize head int8", "heal method=lora").kind == "illegal-order"  # only removals count
    ok("drop blocks[3]", "heal method=linear")
    ok("collapse blocks auto(count=2)", "heal method=lora steps=200 distill=true")


def test_blocks_are_removed_before_heal_not_after():
    err = error_of("drop blocks[1]", "heal method=linear", "drop blocks[3]")
    assert err.kind == "illegal-order" and err.line == 4
    assert "`drop` after `heal` (line 3)" in err.message and "above line 3" in err.hint
    assert error_of("collapse blocks[0:2]", "heal method=lora", "collapse blocks[4:6]").kind == "illegal-order"


def test_a_token_step_between_a_removal_and_its_heal_is_refused():
    """The removal recorded rows of the tokens it saw for the heal; a merge after it left fewer (a raw
    "size of tensor a (12) must match … (16)" in the fit)."""
    err = error_of("drop blocks[4]", "tokens after blocks[1] merge ratio=0.25", "heal method=linear")
    assert err.kind == "illegal-order" and err.line == 4
    assert "`tokens after … merge` on line 3 changes them in between" in err.message and err.hint == \
        "move line 3 below this `heal`"
    assert error_of("drop blocks[4]", "tokens after blocks[1] prune", "drop blocks[3]",
                    "heal method=linear").kind == "illegal-order"
    ok("tokens after blocks[1] merge ratio=0.25", "drop blocks[3]", "heal method=linear")
    ok("drop blocks[4]", "heal method=linear", "tokens after blocks[1] merge ratio=0.25")
    ok("drop blocks[4]", "tokens unpad", "heal method=linear")


def test_several_heals_in_a_row_are_fine_and_rules_without_selectors_never_clash():
    spec = ok("drop blocks auto(ratio=0.25)", "heal method=linear", "heal method=linear",
              "heal method=lora", "keep head", "adapt blocks lora", "quantize blocks.*.** int4")
    assert [r.kind for r in spec.policy("p").rules].count("heal") == 3


def test_heal_is_a_rule_without_a_selector():
    spec = ok("drop blocks[1]", "heal method=linear")
    heal = spec.policy("p").rules[1]
    assert heal.selector is None and heal.kind == "heal"


def test_tokens_unpad_comes_before_every_tokens_after_rule():
    err = error_of("tokens after blocks[1] prune", "keep head", "tokens unpad", "tokens after blocks[3] merge")
    assert err.kind == "illegal-order" and (err.line, err.column, err.diagnostics[0].width) == (4, 5, 12)
    assert "`tokens unpad` after `tokens after` (line 2)" in err.message
    assert "move `tokens unpad` above line 2, the first `tokens after` rule" in err.hint
    assert len(err.diagnostics) == 1  # one problem for the unpad, not one per earlier `tokens after`
    ok("tokens unpad", "tokens after blocks[1] prune", "tokens after blocks[3] merge")
    ok("keep head", "tokens unpad")  # alone, or with other rules before it


def test_a_second_tokens_unpad_is_a_duplicate():
    err = error_of("tokens unpad", "tokens after blocks[1] prune", "tokens unpad", "tokens unpad")
    assert [(d.kind, d.line) for d in err.diagnostics] == [("duplicate", 4), ("duplicate", 5)]
    assert "a second `tokens unpad` rule (the first is on line 2)" in err.message
    with pytest.raises(SpecError) as other_policy:
        parse("policy a {\n tokens unpad\n}\npolicy b {\n tokens unpad\n tokens unpad\n}\n")
    assert [(d.kind, d.line) for d in other_policy.value.diagnostics] == [("duplicate", 6)]  # per policy


def test_tokens_unpad_changes_no_weights_and_clashes_with_no_selector():
    ok("tokens unpad", "collapse blocks[0:2]", "drop blocks[5]", "heal method=linear", "quantize head int8")
    ok("drop blocks[1]", "tokens unpad", "adapt blocks lora", "keep head")
    err = error_of("tokens unpad", "heal method=linear")  # not a removal: heal still needs one
    assert err.kind == "illegal-order" and err.line == 3


def test_error_init_needs_a_precision_rule_before_it():
    err = error_of("adapt blocks.*.attn.q lora init=error", "quantize blocks.*.attn.q int4")
    assert err.kind == "illegal-order" and (err.line, err.column) == (2, 5)
    assert "nothing before line 2 quantizes" in err.message and "init=kaiming" in err.hint
    ok("quantize blocks.*.attn.q int2", "adapt blocks.*.attn.q lora rank=16 init=error")
    ok("precision blocks.*.** choose {int4, int8} budget avg_bits<=6 by output_mse", "adapt blocks.*.** dora init=error")
    spec = ok("quantize blocks.*.attn.q int2", "adapt blocks.*.attn.q lora init=error")
    assert spec.policy("p").rules[1].get("init") == "error"


def test_an_auto_removal_after_a_token_rule_is_rejected_with_the_fix():
    """Its search compared streams of different token counts: a raw size-mismatch RuntimeError."""
    for removal in ("drop blocks auto(count=1)", "collapse blocks auto(count=1)"):
        err = error_of("tokens after blocks[1] prune keep=0.5", removal)
        assert err.kind == "illegal-order" and err.line == 3 and "move this" in err.hint and "above line 2" in err.hint
    ok("drop blocks auto(count=1)", "tokens after blocks[1] prune keep=0.5")
    ok("tokens after blocks[1] prune keep=0.5", "drop blocks[5]")  # an explicit removal binds after it
    ok("tokens unpad", "drop blocks auto(count=1)")  # unpad leaves every real token


def _many_quantize_rules(count: int) -> str:
    projs = ("gate", "up", "down")
    return "policy p {\n" + "\n".join(f"    quantize model.layers[{i // 3}].mlp.{projs[i % 3]}_proj int4 group=64 "
                                      "method=gptq" for i in range(count)) + "\n}\n"


def test_rules_on_distinct_selectors_are_not_compared_pair_by_pair(monkeypatch):
    """Every pair of rules was compared, and the removals between them counted again per pair:
    a policy of 1000 lines took 37 s to check. Only rules that can clash are compared now."""
    from slimfx.dsl import check

    policy = parse(_many_quantize_rules(300), check=False).policy("p")
    calls = {"pairs": 0, "formats": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(check, "_pair_problem", counting("pairs", check._pair_problem))
    monkeypatch.setattr(check, "format_selector", counting("formats", check.format_selector))
    assert check.check_policy(policy) == []
    assert calls == {"pairs": 0, "formats": 300}  # each selector written once


def test_a_policy_of_a_thousand_rules_checks_quickly():
    import time

    from slimfx.dsl.check import check_spec

    spec = parse(_many_quantize_rules(1000), check=False)
    start = time.perf_counter()
    check_spec(spec)
    assert time.perf_counter() - start < 5  # milliseconds now; 35 s before


@pytest.mark.parametrize("rules, removal_at", [(["adapt head lora merge=true"] * 600, None),
                                               (["adapt blocks[1] lora merge=true"] * 300 + ["drop blocks[5]"]
                                                + ["adapt blocks[1] lora merge=true"] * 300, 300)])
def test_copies_of_a_rule_that_may_repeat_are_compared_once_each_side_of_a_removal(monkeypatch, rules, removal_at):
    """Each copy was compared with every earlier one on its selector and found nothing: 6,000
    copies of `adapt head lora merge=true` took 47 s. Copies alike are compared once, or twice
    where a removal between them renumbers the blocks (which is what can tell them apart)."""
    from slimfx.dsl import check

    policy = parse("policy p {\n" + "\n".join(rules) + "\n}\n", check=False).policy("p")
    pairs = []
    real = check._pair_problem
    monkeypatch.setattr(check, "_pair_problem", lambda earlier, later, *a: pairs.append((earlier, later)) or
                        real(earlier, later, *a))
    problems = check.check_policy(policy)
    if removal_at is None:
        assert problems == [] and len(pairs) == len(rules) - 1
    else:  # the drop after an adapt is an illegal order, and each later copy meets one or two earlier ones
        assert [d.line for d in problems] == [removal_at + 2] and len(pairs) <= 2 * len(rules)


@pytest.mark.parametrize("rule", ["keep head", "quantize x int8", "tokens after blocks[0] prune"])
def test_a_rule_written_a_thousand_times_gives_one_problem_per_copy(rule):
    """Every earlier copy clashed with every later one: 499,500 diagnostics, a 78 MB message, 33 s."""
    with pytest.raises(SpecError) as e:
        parse("policy p {\n" + f"    {rule}\n" * 1000 + "}\n")
    assert len(e.value.diagnostics) == 999
    assert [d.line for d in e.value.diagnostics] == list(range(3, 1002))


def test_raw_module_paths_are_renumbered_by_a_removal_too():
    """Bind renumbers a module list's raw indexes after a `drop` as it does `blocks[i]`: the
    same raw path on either side of a removal names another module, no duplicate."""
    ok("drop model.layers[0]", "keep model.layers[0]")
    ok("drop transformer.h[0]", "keep transformer.h[0]")
    ok("drop model.layers[0]", "tokens after model.layers[2] prune keep=0.5", "drop model.layers[0]",
       "tokens after model.layers[2] prune keep=0.5")
    ok("keep model.layers.*.mlp.up_proj", "drop model.layers[3]", "keep model.layers.*.mlp.up_proj")
    # without a removal between them they are still compared
    assert error_of("keep model.layers[0]", "drop model.layers[0]").kind == "invalid-combination"
    assert error_of("drop blocks[0]", "keep transformer.h[0]", "quantize transformer.h[0] int8").kind == \
        "invalid-combination"
    assert error_of("drop model.layers[0]", "quantize lm_head int8", "quantize lm_head int4").kind == "duplicate"
