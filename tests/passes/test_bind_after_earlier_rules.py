"""What bind() sees after the rules before: blocks renumbered after an explicit or `auto` drop
(raw list indexes too), an auto drop's stand-in count rounded as the drop itself counts, and an
adapter merged in leaving its linears free for another. Each case was a mutant the other tests let
by (mutation audit of the binder)."""
import re

import pytest

from test_bind import error_of, llama, plan_of  # noqa: F401 - a fixture


def test_a_raw_list_index_after_a_drop_is_renumbered(llama):
    path = llama.blocks_path  # model.layers
    plan = plan_of(llama, "drop blocks[0]", f"quantize {path}[2].mlp.down_proj int8")
    assert [t.path for t in plan.rules[1].targets] == [f"{path}.3.mlp.down_proj"]
    err = error_of(llama, "drop blocks[0]", f"quantize {path}[3].mlp.down_proj int8")
    assert err.kind == "selector" and err.line == 3


def test_an_auto_drops_ratio_is_rounded_for_the_rules_after_it_as_the_drop_rounds_it(llama):
    """ratio=0.7 of 4 blocks removes round(2.8) = 3: one block is left (int() would leave two)."""
    err = error_of(llama, "drop blocks auto(ratio=0.7)", "quantize blocks[1].mlp.down int8")
    assert err.kind == "selector" and "out of range" in err.message and err.line == 3
    plan_of(llama, "drop blocks auto(ratio=0.7)", "quantize blocks[0].mlp.down int8")


def test_an_auto_drop_of_its_whole_selection_leaves_the_rest(llama):
    err = error_of(llama, "drop blocks[2:4] auto(count=2)", "quantize blocks[3].mlp.down int8")
    assert err.kind == "selector" and "out of range" in err.message and err.line == 3
    plan_of(llama, "drop blocks[2:4] auto(count=2)", "quantize blocks[1].mlp.down int8")


def test_a_keep_on_an_auto_drops_candidates_protects_them_without_an_error(llama):
    drop = plan_of(llama, "keep blocks[3]", "drop blocks auto(count=1)").rules[1]
    assert drop.protected == (llama.blocks[3].path,)
    assert any("not candidates" in w for w in drop.warnings)


def test_an_adapter_merged_in_leaves_its_linears_free_for_another(llama):
    """Different selector texts, so the static duplicate check (equal text only) cannot decide it."""
    plan = plan_of(llama, "adapt blocks.*.attn.q lora merge=true", "adapt blocks[0].attn.q lora")
    assert len(plan.rules[1].targets) == 1


def test_what_keep_protects_after_an_auto_drop_is_checked_once_its_search_has_chosen():
    """The stand-in an auto drop leaves for the rules after it removes the last candidates; the
    search removed others, so `blocks[3]` after it was another block than the kept one on the
    stand-in, and compile refused a rule its binding after the search accepts."""
    import torch

    import slimfx
    from slimfx.models import tiny

    lm = tiny("llama", layers=8, seed=4, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, 250, (4, 32), generator=g),
              "attention_mask": torch.ones(4, 32, dtype=torch.long)} for _ in range(2)]
    chosen = slimfx.compile(lm, "keep blocks[3]\ndrop blocks auto(count=2)", calib=calib).report.rules[1].targets
    assert chosen == ("model.layers.0", "model.layers.6")  # so blocks[3] after it is layer 4, not kept
    for rule, says in (("quantize blocks[3].mlp.down int8", "model.layers.4.mlp.down_proj"),
                       ("drop blocks[3]", "model.layers.4")):
        policy = f"keep blocks[3]\ndrop blocks auto(count=2)\n{rule}"
        assert any("decided at compile time" in w for w in slimfx.plan(lm, policy).rules[2].warnings)
        assert slimfx.compile(lm, policy, calib=calib).report.rules[2].targets[0].startswith(says)
    for rule, says in (("quantize blocks[2].mlp.down int8", "all are protected by `keep`"),
                       ("drop blocks[2]", "`keep` protects model.layers.3")):  # blocks[2] is layer 3 after it
        with pytest.raises(slimfx.SpecError, match=re.escape(says)):
            slimfx.compile(lm, f"keep blocks[3]\ndrop blocks auto(count=2)\n{rule}", calib=calib)
