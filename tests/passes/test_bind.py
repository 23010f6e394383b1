"""bind(): rules -> concrete targets, `keep`, rule/model mismatches, size estimates, plan table."""
import pytest
import torch

from slimfx import SpecError, parse
from slimfx.models import tiny
from slimfx.passes.bind import bind, graph_bytes
from slimfx.passes.capture import capture
from slimfx.plan_table import plan_text


@pytest.fixture(scope="module")
def llama():
    loaded = tiny("llama", layers=4)
    return capture(loaded.model, loaded.example_inputs)


@pytest.fixture(scope="module")
def gpt2():
    loaded = tiny("gpt2", layers=2)
    return capture(loaded.model, loaded.example_inputs)


def plan_of(graph, *rules):
    spec = parse("policy p {\n" + "\n".join("    " + r for r in rules) + "\n}\n")
    return bind(graph, spec.policy("p"), source=spec.source)


def error_of(graph, *rules) -> SpecError:
    with pytest.raises(SpecError) as e:
        plan_of(graph, *rules)
    return e.value


def test_quantize_binds_every_linear_in_every_block(llama):
    (bound,) = plan_of(llama, "quantize blocks.*.** : Linear int4").rules
    assert len(bound.targets) == 4 * 7  # q k v o gate up down
    assert all(t.kind == "linear" and t.block is not None for t in bound.targets)
    assert bound.estimate.bytes_after < bound.estimate.bytes_before / 6  # ≈4.25 of 32 bits


def test_a_block_selector_expands_to_its_linears_and_says_what_it_skipped(llama):
    (bound,) = plan_of(llama, "quantize blocks[0] int8").rules
    assert {t.path.rsplit(".", 1)[-1] for t in bound.targets} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"}
    (bound,) = plan_of(llama, "quantize blocks[0].** int8").rules
    assert any("non-linear" in w and "norm" in w for w in bound.warnings)


def test_a_target_reached_twice_is_bound_once(gpt2):
    # On GPT-2, `blocks.*.**` reaches c_attn by its module path and by its role (attn.qkv): bound
    # twice, the precision pass rewrote it twice and stopped ("already has an attribute 'qweight'").
    (bound,) = plan_of(gpt2, "quantize blocks.*.** int4").rules
    paths = [t.path for t in bound.targets]
    assert len(paths) == len(set(paths)) == 2 * 4
    assert any("skipped 4 non-linear targets" in w for w in bound.warnings)  # 2 norms × 2 blocks, once each


def test_keep_removes_targets_from_every_other_rule(llama):
    keep, quant = plan_of(llama, "keep blocks[0].mlp.down", "quantize blocks.*.mlp.down int8").rules
    assert [t.path for t in keep.targets] == ["model.layers.0.mlp.down_proj"]
    assert [t.path for t in quant.targets] == [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]
    assert quant.protected == ("model.layers.0.mlp.down_proj",)


def test_everything_protected_is_an_error_not_a_no_op(llama):
    err = error_of(llama, "keep blocks[0]", "adapt blocks[0].attn.q lora")
    assert err.kind == "selector" and "protected by `keep`" in err.message


def test_keep_of_what_a_drop_removes_is_an_error(llama):
    err = error_of(llama, "keep blocks[2].mlp.up", "drop blocks[1:3]")
    assert err.kind == "invalid-combination" and "model.layers.2" in err.message


def test_rules_after_a_drop_bind_to_the_renumbered_blocks(llama):
    """After `drop blocks[1:3]` the model has two blocks: blocks[1] is model.layers.3, blocks.*
    the two left, and blocks[2] no longer exists."""
    _, keep, quant = plan_of(llama, "drop blocks[1:3]", "keep blocks[1].mlp.up",
                             "quantize blocks.*.mlp.up int8").rules
    assert [t.path for t in keep.targets] == ["model.layers.3.mlp.up_proj"]
    assert [t.path for t in quant.targets] == ["model.layers.0.mlp.up_proj"]
    err = error_of(llama, "drop blocks[1:3]", "keep blocks[2].mlp.up")
    assert err.kind == "selector" and "out of range" in err.message and "2 items" in err.message


def test_collapse_keeps_its_first_block_for_later_rules(llama):
    _, quant = plan_of(llama, "collapse blocks[0:3]", "quantize blocks.*.attn.q int8").rules
    assert [t.path for t in quant.targets] == ["model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    assert quant.deferred_by is None


def test_heal_binds_without_a_selector(llama):
    _, heal = plan_of(llama, "drop blocks[2]", "heal method=linear").rules
    assert heal.targets == () and heal.blocks == () and "map at the cut" in heal.estimate.note
    _, lora = plan_of(llama, "drop blocks[2]", "heal method=lora steps=200 generate=4096").rules
    assert lora.estimate.note == "LoRA r=8 beside each cut, 200 steps, on 4,096+ tokens the original writes first, " \
                                 "merged afterwards"


def test_block_rules_need_blocks(llama):
    assert error_of(llama, "drop blocks.*.mlp.up").kind == "selector"
    assert error_of(llama, "collapse blocks[2]").kind == "invalid-combination"
    (bound,) = plan_of(llama, "collapse blocks[1:4]").rules
    assert [b.index for b in bound.blocks] == [1, 2, 3]
    assert "2 of 4 blocks removed" in bound.estimate.note


@pytest.mark.parametrize("rule", ["drop {blocks[1], blocks[3].mlp.down}", "collapse {blocks[1:3], blocks[3].attn.q}"])
def test_a_block_rule_refuses_a_selector_that_also_names_what_is_not_a_block(llama, rule):
    """It kept the blocks among the matches and dropped the rest silently: block 1 went, and
    blocks[3].mlp.down was never mentioned (while `drop blocks[1].mlp` alone is refused)."""
    e = error_of(llama, rule)
    assert e.kind == "selector"
    assert "model.layers.3." in e.message and "acts on blocks" in e.message


def test_tokens_after_needs_exactly_one_block(llama):
    (bound,) = plan_of(llama, "tokens after blocks[1] prune keep=0.5").rules
    assert [b.index for b in bound.blocks] == [1]
    err = error_of(llama, "tokens after blocks[1:3] prune")
    assert err.kind == "selector" and "exactly one block" in err.message


def test_overlapping_precisions_are_caught_on_the_model(llama):
    err = error_of(llama, "quantize blocks[0].** : Linear int8", "quantize blocks.*.attn.q int4")
    assert err.kind == "duplicate" and "line 2" in err.message and err.line == 3
    err = error_of(llama, "quantize blocks.*.attn.q int4", "adapt blocks[0].attn.{q,k} lora merge=true")
    assert err.kind == "illegal-order"


@pytest.fixture(scope="module")
def bert():
    loaded = tiny("bert", layers=4)
    return capture(loaded.model, loaded.example_inputs)


def test_overlapping_token_steps_are_caught_on_the_model(bert):
    """Two steps after one block broke the graph (a merge read a value defined after it); the text
    check sees only equal selectors. Blocks are compared as the model is when each rule runs."""
    err = error_of(bert, "tokens after blocks[0] merge", "tokens after {blocks[0], blocks[2]} merge")
    assert err.kind == "duplicate" and "encoder.layer.0" in err.message and "line 2" in err.message
    err = error_of(bert, "drop blocks[1]", "tokens after blocks[1] prune", "tokens after blocks[0:2] merge")
    assert err.kind == "duplicate" and "encoder.layer.2" in err.message  # blocks[1] once block 1 is gone
    assert len(plan_of(bert, "tokens after blocks[0] merge", "tokens after blocks[1:3] merge").rules) == 2


def test_token_steps_written_out_of_block_order_are_refused(bert):
    """A step above steps already made read token indices that no longer held: the compiled graph
    failed at run time (index out of bounds), found by tests/test_compile_fuzz.py."""
    err = error_of(bert, "tokens after blocks[1:3] merge", "tokens after blocks[0] merge")
    assert err.kind == "illegal-order" and err.line == 3 and "encoder.layer.2" in err.message
    assert "move this rule above line 2" in err.hint


def test_a_merge_on_a_causal_model_is_refused_by_plan_not_after_the_rules_above_it(llama):
    """`plan` said "ready" and compile refused it only when the merge pass ran, after every rule
    above it (minutes of GPTQ on SmolLM2)."""
    err = error_of(llama, "quantize blocks.*.** : Linear int4", "tokens after blocks[1] merge")
    (d,) = err.diagnostics
    assert d.kind == "unsupported" and d.line == 3 and "LlamaForCausalLM is causal" in d.message
    assert "`prune`" in d.hint


def test_selector_errors_keep_their_place_and_all_come_together(gpt2):
    err = error_of(gpt2, "quantize blocks.*.attn.q int8", "adapt blocks.*.atn.qkv lora")
    assert [(d.line, d.column) for d in err.diagnostics] == [(2, 14), (3, 11)]
    assert "attn.qkv" in err.diagnostics[0].hint


def test_adapter_and_estimates(llama):
    (bound,) = plan_of(llama, "adapt blocks.*.attn.{q,v} lora rank=4").rules
    assert len(bound.targets) == 8
    added = sum(4 * (t.shapes[0][0] + t.shapes[0][1]) for t in bound.targets)  # r·(out + in) each
    assert bound.estimate.params_after - bound.estimate.params_before == added
    assert bound.estimate.bytes_after - bound.estimate.bytes_before == 4 * added
    (half,) = plan_of(llama, "adapt blocks.*.attn.{q,v} dora rank=4 dtype=fp16").rules
    magnitudes = sum(t.shapes[0][0] for t in half.targets)
    assert half.estimate.params_after - half.estimate.params_before == added + magnitudes
    assert half.estimate.bytes_after - half.estimate.bytes_before == 2 * added + 4 * magnitudes


def test_empty_policy_binds_to_an_empty_plan(llama):
    plan = bind(llama, None)
    assert plan.rules == () and plan.bytes_total == graph_bytes(llama) > 0


def test_plan_table_lists_every_rule_with_status(llama):
    from slimfx.passes import precision  # noqa: F401  registers quantize

    text = plan_text(plan_of(llama, "drop blocks[1]", "quantize blocks.*.** : Linear int4 group=64", "keep embed",
                             "adapt blocks.*.attn.q lora", "tokens after blocks[0] prune keep=0.5"), "p.slim",
                     width=400)
    assert "quantize blocks.*.** : Linear int4 group=64" in text and "keep embed" in text
    rows = {line.split("│")[2].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert "ready" in rows["quantize blocks.*.** : Linear int4 group=64"]
    assert "ready" in rows["keep embed"]  # keep is applied by bind itself
    assert "ready; +3,072 trainable" in rows["adapt blocks.*.attn.q lora"]  # 3 blocks left after the drop
    assert "ready" in rows["drop blocks[1]"]
    assert "ready" in rows["tokens after blocks[0] prune keep=0.5"]


def test_a_tied_weight_is_flagged_and_not_counted_as_freed(gpt2):
    (bound,) = plan_of(gpt2, "quantize head int8").rules
    assert any("lm_head.weight: tied to another module's weight" in w for w in bound.warnings)
    assert bound.estimate.bytes_after > bound.estimate.bytes_before  # the fp32 original stays


def test_a_precision_rule_on_a_tied_weight_counts_the_original_it_keeps():
    """plan said 65,536 → 12,288 bytes for GPT-2's tied head at 6 bits; compile gave 74,240, the
    embedding's weight staying beside the chosen int4 (as `quantize head int4` was planned)."""
    from slimfx.models import tiny
    import slimfx

    m = tiny("gpt2")
    policy = "precision head choose {int8, int4} budget avg_bits<=6 by output_mse"
    planned = slimfx.plan(m, policy).rules[0].estimate
    measured = slimfx.compile(m, policy).report.rules[0]
    assert measured.bytes_after > measured.bytes_before  # the tie keeps the fp32 original
    assert measured.bytes_after <= planned.bytes_after < measured.bytes_after + 65536 // 8  # at most 6 bits, not 4.25
    assert "tied weights kept" in planned.note


class _TiedPair(torch.nn.Module):
    """Two linears sharing one weight: rewriting both frees it (rewrite.release_unread)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, 32, bias=False)
        self.b.weight = self.a.weight

    def forward(self, input):
        return self.b(torch.relu(self.a(input)))


@pytest.mark.parametrize("rule", ["quantize {a, b} int4 group=16", "quantize {a, b} fp16", "quantize {a, b} keep",
                                  "precision {a, b} choose {int8, int4 group=16} budget avg_bits<=8 by output_mse"])
def test_plan_counts_a_tied_weight_its_rule_frees_or_keeps_as_compile_does(rule):
    """Plan added the tied original once per target even where every sharer was rewritten (8 KiB
    → 9.2 KiB planned, 1.25 KiB compiled), or where nothing was (`keep`: 16 KiB against 8)."""
    import slimfx

    torch.manual_seed(0)
    example = {"input": torch.randn(2, 32)}
    planned = slimfx.plan(_TiedPair(), rule, example_inputs=example).rules[0].estimate
    measured = slimfx.compile(_TiedPair(), rule, example_inputs=example, calib=[example]).report.rules[0]
    assert "tied weights kept" not in planned.note
    if rule.startswith("precision"):  # plan says what the budget allows: 8 bits of 2·32·32 weights
        assert measured.bytes_after <= planned.bytes_after == 2048
    else:
        assert planned.bytes_after == measured.bytes_after


@pytest.mark.parametrize("dtype, rule", [(None, "quantize head keep"), (torch.bfloat16, "quantize head bf16"),
                                         (torch.float16, "quantize head fp16"),
                                         (None, "precision head choose {keep, int8} budget avg_bits<=32 by output_mse"),
                                         (None, "quantize head int8")])
def test_plan_counts_gpt2s_tied_head_as_compile_does(dtype, rule):
    """A head left as it is (`keep`, or the half dtype it has) kept no second copy of the embedding
    it shares, and plan counted one (64 KiB → 128 KiB)."""
    from slimfx.models import tiny
    import slimfx

    lm = tiny("gpt2")
    m = lm.model.to(dtype) if dtype is not None else lm.model
    planned = slimfx.plan(m, rule, example_inputs=lm.example_inputs).rules[0].estimate
    measured = slimfx.compile(m, rule, example_inputs=lm.example_inputs, calib=[lm.example_inputs]).report.rules[0]
    assert planned.bytes_after == measured.bytes_after


def test_keep_counts_a_tied_weight_once():
    from slimfx.models import tiny
    import slimfx

    m = tiny("gpt2")  # lm_head is tied to the token embedding
    bound = slimfx.plan(m, "policy p {\n    keep {embed,head}\n}\n").rules[0]
    assert [t.path for t in bound.targets] == ["transformer.wte", "lm_head"]
    assert bound.estimate.bytes_before == bound.targets[0].nbytes == bound.targets[1].nbytes


def test_adapt_from_a_directory_is_sized_at_compile(llama, tmp_path, monkeypatch):
    import slimfx
    from slimfx.runtime.compiled import CompiledModel
    from slimfx.runtime.program_copy import copy_program
    from slimfx.runtime.report import Report

    monkeypatch.chdir(tmp_path)
    base = CompiledModel(copy_program(llama), report=Report(None, llama.model_class))
    slimfx.compile(base, "adapt blocks.*.attn.q lora rank=4").save_adapters(tmp_path / "adapters" / "x")
    (bound,) = plan_of(llama, 'adapt blocks.*.attn.q lora from="adapters/x" merge=true').rules
    assert bound.estimate.params_after == bound.estimate.params_before
    assert bound.estimate.note == "loaded from adapters/x at compile; merged into the base weights"


def test_adapt_from_a_directory_that_is_not_there_is_refused_by_plan_as_by_compile(llama, tmp_path, monkeypatch):
    """plan said "ready"; compile then refused it at once."""
    monkeypatch.chdir(tmp_path)
    e = error_of(llama, 'adapt blocks.*.attn.q lora from="adapters/y"')
    assert e.kind == "no-file" and e.column == 32 and f"no directory {tmp_path / 'adapters' / 'y'}" in e.message


def test_adapt_from_a_directory_without_an_adapter_config_is_refused_by_plan_as_by_compile(llama, tmp_path,
                                                                                          monkeypatch):
    """plan said "ready" for a folder of something else."""
    import slimfx

    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters" / "z").mkdir(parents=True)
    e = error_of(llama, 'adapt blocks.*.attn.q lora from="adapters/z"')
    assert e.kind == "no-file" and e.column == 32
    assert f"{tmp_path / 'adapters' / 'z'} is not a PEFT adapter directory: it has no adapter_config.json" in e.message
    with pytest.raises(slimfx.SpecError, match="it has no adapter_config.json"):
        slimfx.compile(tiny("llama", layers=1), 'adapt blocks.*.attn.q lora from="adapters/z"')


def test_the_report_counts_stored_weights_as_parameters_however_they_are_stored():
    """A quantized linear's packed weight is a buffer: "params after" fell by every quantized
    linear, and an adapter's trainable share came out about three times too large."""
    import slimfx

    lm = tiny("llama")
    original = sum(p.numel() for p in lm.model.parameters())  # no tied weights in tiny llama
    cm = slimfx.compile(lm, "quantize blocks.*.mlp.* : Linear int4 group=32\nquantize blocks.*.attn.o fp16\n"
                            "quantize blocks.*.attn.k int8\nadapt blocks.*.attn.{q,v} lora rank=4")
    adapted = sum(p.numel() for p in cm.adapter_parameters())
    assert cm.report.params_before == original and cm.report.params_after == original + adapted
    adapt = cm.report.rules[-1]
    assert adapt.details["trainable_share"] == pytest.approx(adapted / (original + adapted))
    for rule in cm.report.rules[:-1]:
        assert rule.params_after == rule.params_before


def test_plan_in_a_fresh_process_counts_parameters_before_any_slimfx_op_exists():
    """Counting packed weights looked the slimfx ops up before anything had registered them."""
    import subprocess
    import sys

    code = ("import slimfx; from slimfx.models import tiny; "
            "print(slimfx.plan(tiny('llama'), 'quantize head int8').params_total)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == sum(p.numel() for p in tiny("llama").model.parameters())


class _OutsideResidual(torch.nn.Module):
    """The residual add in the parent's loop, as many research models write it."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU())
                                           for _ in range(3)])
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def test_a_model_that_adds_the_residual_outside_its_blocks_takes_linear_rules_and_refuses_stream_ones():
    """Every non-empty policy raised the graph's internal LintError (the blocks do not chain)."""
    import slimfx

    torch.manual_seed(0)
    model, x = _OutsideResidual().eval(), {"x": torch.randn(2, 5, 32)}
    cm = slimfx.compile(model, "adapt blocks.*.** : Linear lora rank=2", example_inputs=x)
    assert torch.equal(cm(**x), model(**x))  # the adapters start at zero
    cm = slimfx.compile(model, "quantize blocks.*.** : Linear int8\nquantize head int8", example_inputs=x)
    error = (cm(**x) - model(**x)).norm() / model(**x).norm()
    assert 0 < error < 0.02 and cm.lowering.lowered == 4  # every linear quantized, int8-close
    for rule, word in [("drop blocks[1]", "drop"), ("collapse blocks[0:2]", "collapse")]:
        with pytest.raises(SpecError) as e:
            slimfx.compile(model, rule, example_inputs=x)
        assert e.value.kind == "unsupported" and e.value.column == 1
        assert f"`{word}` rewires the residual stream" in e.value.message and "outside the blocks" in e.value.message


def test_an_adapter_after_a_quantize_is_estimated_beside_the_packed_weight():
    """plan said 48.0 KiB → 55.0 KiB (the fp32 weights); compile measured 6.8 KiB → 13.8 KiB."""
    import slimfx

    lm = tiny("llama")
    for quantize in ("quantize blocks.*.** : Linear int4 group=32",
                     "precision blocks.*.** : Linear choose {int8, int4 group=32} budget avg_bits <= 6 by output_mse"):
        policy = f"{quantize}\nadapt blocks.*.attn.{{q,v}} lora rank=4"
        planned = slimfx.plan(lm, policy).rules[1].estimate
        measured = slimfx.compile(lm, policy, calib=[lm.example_inputs]).report.rules[1]
        assert planned.bytes_after - planned.bytes_before == measured.bytes_after - measured.bytes_before
        assert abs(planned.bytes_before - measured.bytes_before) <= 0.1 * measured.bytes_before, quantize


@pytest.mark.parametrize("choices, budget, smallest", [
    ("{int8, int4 group=32}", "bytes<=1KiB", "41,472 bytes"),  # every target int4 with its scales
    ("{int8, int4 group=32}", "avg_bits<=4.2", "4.5 bits/weight"),  # 4 bits + fp16 scale per 32
    ("{int2 group=16 sym=false, int4}", "avg_bits<=2.1", "3.125 bits/weight"),
])
def test_plan_refuses_a_budget_no_choice_can_meet_as_compile_does(choices, budget, smallest):
    """plan said "ready" and ≈1.0 KiB; compile then refused with the smallest achievable."""
    import slimfx

    with pytest.raises(SpecError) as e:
        slimfx.plan(tiny("llama"), f"precision blocks.*.** : Linear choose {choices} budget {budget} by output_mse")
    assert e.value.kind == "out-of-range" and f"the smallest achievable is {smallest}" in e.value.message


def test_plan_estimates_a_loose_budget_at_the_largest_choice_as_compile_reaches_it():
    """avg_bits<=16 over {int8, int4} was estimated at 16 bits (≈144 KiB); compile gives all int8."""
    import slimfx

    lm = tiny("llama")
    policy = "precision blocks.*.** : Linear choose {int8, int4 group=32} budget avg_bits<=16 by output_mse"
    planned = slimfx.plan(lm, policy).rules[0].estimate
    measured = slimfx.compile(lm, policy, calib=[lm.example_inputs]).report.rules[0]
    assert planned.bytes_after == measured.bytes_after


@pytest.mark.parametrize("layers, rule, hint", [
    # after the last block: was `blocks[3:-1]`, an empty slice, and prune takes one block
    (4, "tokens after blocks[3] prune keep=0.5", "select the block before it, `blocks[2]`, or an earlier one"),
    (4, "tokens after blocks[1:] merge ratio=0.3", "e.g. `blocks[1:-1]`"),
    (4, "tokens after blocks[3] merge ratio=0.3", "select the block before it, `blocks[2]`"),
    (1, "tokens after blocks[0] prune keep=0.5", "this model has one block"),
    # every block removed: was `blocks[-5:-1]` whatever the model's depth
    (2, "collapse blocks[0:2]", "a model of 2 blocks has no `collapse` that leaves more than one"),
    (3, "collapse blocks[0:3]", "e.g. `blocks[0:2]`"),
    (2, "drop blocks[0:2]", "e.g. `blocks[0:1]`"),
    (1, "drop blocks[0]", "a model of 1 block has no `drop` that leaves one"),  # was "all 1 blocks", "1 blocks"
])
def test_a_refused_block_rule_suggests_a_selector_the_model_has(layers, rule, hint):
    bert = tiny("bert", layers=layers)
    e = error_of(capture(bert.model, bert.example_inputs), rule)
    assert e.kind == "out-of-range" and hint in e.hint


def test_plan_refuses_a_collapse_of_several_ranges_as_compile_does(llama):
    """`plan` said "ready; 2 of 6 blocks removed" for `collapse blocks[::2]`, which compile refuses
    (LaCo merges one run into its first block)."""
    err = error_of(llama, "collapse blocks[::2]")
    assert len(err.diagnostics) == 1, "plan must refuse a collapse of several ranges, as compile does"
    (d,) = err.diagnostics
    assert d.kind == "selector" and "one contiguous range of blocks, and the selector gives 2 ranges" in d.message
    assert d.hint == "write one range, e.g. `collapse blocks[20:24]`"
    # Contiguous in the model as the rule sees it: after `drop blocks[1]`, blocks 0 and 1 are next to each other.
    _, collapse = plan_of(llama, "drop blocks[1]", "collapse blocks[0:2]").rules
    assert [b.path for b in collapse.blocks] == ["model.layers.0", "model.layers.2"]


@pytest.mark.parametrize("selector", ["blocks[9]", "nothing_here", "blocks[0].attn.q : Conv2d"])
def test_a_keep_selector_problem_is_reported_once(llama, selector):
    """`keep` is resolved for what it protects and again when bound: each added the same problem."""
    err = error_of(llama, f"keep {selector}")
    assert len(err.diagnostics) == 1, f"reported {len(err.diagnostics)} times: {err.diagnostics}"
    both = error_of(llama, f"keep {selector}", "quantize blocks[9].attn.q int8")  # other rules' problems stay
    assert [d.line for d in both.diagnostics] == [2, 3]


def test_the_report_counts_a_heal_map_as_parameters_as_it_counts_its_bytes():
    """`heal method=linear` stores a d × d buffer (`heal_map_*`): its bytes were counted, its
    parameters not (params 106,816 → 106,816, bytes 427,328 → 443,712)."""
    import slimfx

    cm = slimfx.compile(tiny("llama", layers=3), "drop blocks[1]\nheal method=linear")
    heal = cm.report.rules[1]
    d = 64  # tiny llama's hidden size: the map is d × d, fp32
    assert heal.bytes_after - heal.bytes_before == d * d * 4
    assert heal.params_after - heal.params_before == d * d, "the heal map is weights: count it in params"
    assert (heal.params_before, heal.params_after) == (106_816, 110_912)
    assert cm.report.params_after == heal.params_after == 110_912
