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


def test_duplicate_rules_and_policies():
    assert error_of("tokens after blocks[1] prune", "tokens after blocks[1] merge").kind == "duplicate"
    with pytest.raises(SpecError) as e:
        parse("policy a {\n}\npolicy a {\n}\n")
    assert e.value.kind == "duplicate" and e.value.line == 3


def test_check_can_be_skipped_for_tools_that_want_the_raw_ast():
    spec = parse("policy p {\n keep head\n quantize head int8\n}", check=False)
    assert len(spec.policy("p").rules) == 2
