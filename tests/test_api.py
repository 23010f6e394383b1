"""compile() / plan(): policy resolution, the empty policy is the identity on every architecture,
the user's model is never touched, and unimplemented rules are refused, never skipped."""
import re

import pytest
import torch
from hypothesis import assume, given, settings

import slimfx
from slimfx import SpecError
from slimfx.models import TINY_ARCHS, tiny
from slimfx.passes.capture_cache import clear_cache
from slimfx.testing import bare_rules, invalid_policies

SPEC = "policy p {\n    quantize blocks.*.** : Linear int4\n}\n"


def state_bytes(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_output(a, b):
    assert type(a) is type(b)
    leaves_a, leaves_b = _leaves(a), _leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        assert torch.equal(x, y)


def _leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if hasattr(out, "values") else out
    return [t for v in values for t in _leaves(v)] if not isinstance(out, torch.Tensor) else [out]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_empty_policy_is_bit_identical_and_leaves_the_model_alone(arch):
    loaded = tiny(arch)
    before = state_bytes(loaded.model)
    cm = slimfx.compile(loaded.model, "", example_inputs=loaded.example_inputs)
    with torch.no_grad():
        assert_same_output(cm(**loaded.example_inputs), loaded.model(**loaded.example_inputs))
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert cm.report.rules == () and cm.report.policy is None
    for p in cm.parameters():  # no storage shared with the user's model
        assert all(p.data_ptr() != q.data_ptr() for q in loaded.model.parameters())


def test_loaded_model_carries_its_inputs_and_calls_match_positionally():
    loaded = tiny("llama")
    cm = slimfx.compile(loaded, "")
    ids, mask = loaded.example_inputs["input_ids"], loaded.example_inputs["attention_mask"]
    with torch.no_grad():
        assert torch.equal(cm(ids, mask).logits, cm(input_ids=ids, attention_mask=mask).logits)
        # attention_mask may be omitted, as on the original: all ones
        assert torch.equal(cm(input_ids=ids).logits, cm(ids, torch.ones_like(mask)).logits)


def test_policy_as_path_text_spec_and_policy(tmp_path):
    loaded = tiny("llama")
    f = tmp_path / "p.slim"
    f.write_text(SPEC)
    spec = slimfx.parse(SPEC)
    for policy in (str(f), f, SPEC, spec, spec.policy("p")):
        plan = slimfx.plan(loaded, policy)
        assert plan.policy.name == "p" and len(plan.rules[0].targets) == 14


def test_missing_policy_file_and_several_policies_need_a_name(tmp_path):
    loaded = tiny("llama")
    with pytest.raises(SpecError, match="no policy file"):
        slimfx.plan(loaded, str(tmp_path / "nope.slim"))
    two = "policy a {\n keep head\n}\npolicy b {\n keep embed\n}\n"
    with pytest.raises(SpecError, match="holds 2 policies"):
        slimfx.plan(loaded, two)
    assert slimfx.plan(loaded, two, name="b").policy.name == "b"


def test_unimplemented_rules_stop_compile_with_what_to_do(monkeypatch):
    """Every rule has a pass in this version; one the grammar gains before its pass is refused."""
    from slimfx.dsl import ast as A
    from slimfx.passes.pipeline import PASSES

    monkeypatch.delitem(PASSES, A.Tokens)
    loaded = tiny("llama")
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "policy p {\n    tokens after blocks[0] prune keep=0.5\n}\n")
    assert e.value.kind == "unsupported" and e.value.line == 2 and "`tokens`" in e.value.message
    assert "not implemented" in e.value.message and "slimfx plan" in e.value.hint


def test_bare_rules_are_one_inline_policy_with_the_users_line_numbers():
    loaded = tiny("llama")
    cm = slimfx.compile(loaded, "# int8 attention\nquantize blocks.*.attn.* : Linear int8\nkeep head")
    assert cm.report.policy == "inline" and [r.line for r in cm.report.rules] == [2, 3]
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "keep head\nquantize blocks.*.atn.* int8")
    assert e.value.kind == "selector" and e.value.line == 2
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "quantize_me.slim")
    assert e.value.kind == "no-file"


@settings(max_examples=150, deadline=None)
@given(bare_rules())
def test_every_drawn_line_of_rules_is_read_as_rules(text):
    """compile(model, text) decides whether a string is a file, policy text or bare rules: every
    drawn list of rules (with comments, blank lines, odd spacing; one line or many) must come out
    as those rules."""
    from slimfx.api import _read_spec
    from slimfx.dsl.parser import parse

    bare = parse(text, bare=True).policies
    assume(bare[0].rules)  # comments alone are the empty policy either way
    assert _read_spec(text).policies == bare


@settings(max_examples=150, deadline=None)
@given(invalid_policies(bare=True))
def test_every_drawn_mistake_in_rules_is_reported_as_parse_reports_it(mistake):
    """compile(model, text) read `quantise head int8\n` (one line and its newline) as a policy
    file's text: "expected `policy`" where parse(text, bare=True) says unknown-keyword and
    did-you-mean; 7 of 60 drawn mistakes were reported as another kind."""
    from slimfx.api import _read_spec
    from slimfx.dsl.parser import parse

    with pytest.raises(SpecError) as want:
        parse(mistake.text, bare=True)
    with pytest.raises(SpecError) as got:
        _read_spec(mistake.text)
    assert [(d.kind, d.line, d.column) for d in got.value.diagnostics] == \
        [(d.kind, d.line, d.column) for d in want.value.diagnostics]


def test_errors_in_bare_rules_point_at_the_users_own_columns_on_every_line():
    """The first line's columns were off by 16: the rules were wrapped in `policy inline { `."""
    loaded = tiny("llama")
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "quantize blocks.*.atn.* int8")
    assert (e.value.line, e.value.column) == (1, 10) and e.value.source_line == "quantize blocks.*.atn.* int8"
    assert "\n             ^^^^^^^^^^^^^^\n" in str(e.value)  # the caret under the selector, not 16 further on
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "quantize head int9")
    assert (e.value.kind, e.value.line, e.value.column) == ("unknown-keyword", 1, 15)
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "keep head\nquantize blocks[99] int8")
    assert (e.value.line, e.value.column) == (2, 10)
    with pytest.raises(SpecError, match="did you mean `quantize`") as e:  # it said "expected `policy`"
        slimfx.compile(loaded, "quantise head int8\nkeep embed")
    assert (e.value.kind, e.value.line, e.value.column) == ("unknown-keyword", 1, 1)
    with pytest.raises(SpecError, match="did you mean `policy`"):  # a misspelt header is still a header
        slimfx.compile(loaded, "polcy p {\n    keep head\n}\n")


def test_one_line_of_policy_text_is_parsed_as_rules_not_looked_up_as_a_file():
    """`quantise head int8` was reported as "no policy file 'quantise head int8'"."""
    loaded = tiny("llama")
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, "quantise head int8")
    assert e.value.kind == "unknown-keyword" and "did you mean `quantize`?" in str(e.value)
    with pytest.warns(UserWarning, match="the policy has no rules"):
        assert slimfx.compile(loaded, "# nothing yet").report.rules == ()
    for name in ("gone.slim", "my policy.slim", "specs/gone", "specs/v{2}.slim", "v{2}.slim"):
        with pytest.raises(SpecError) as e:
            slimfx.compile(loaded, name)
        assert e.value.kind == "no-file", name


def test_a_compiled_model_compiles_again_and_is_not_changed():
    loaded = tiny("llama")
    first = slimfx.compile(loaded, "adapt blocks.*.attn.q lora rank=4")
    state = {k: v.clone() for k, v in first.state_dict().items()}
    nodes = len(first.program.graph.nodes)
    second = slimfx.compile(first, "quantize blocks.*.mlp.* : Linear int8")
    assert [r.kind for r in second.report.rules] == ["quantize"] and len(second.adapters) == 2
    assert len(first.program.graph.nodes) == nodes
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in state.items())
    with pytest.raises(TypeError, match="already captured"):
        slimfx.compile(first, "keep head", example_inputs=loaded.example_inputs)


def test_a_model_compiled_again_keeps_what_each_compile_did_through_save(tmp_path):
    """The second compile's report and artifact held only its own policy: an artifact quantized
    after its adapters were trained no longer said it had adapters from another policy."""
    first = slimfx.compile(tiny("llama"), "policy lora {\n    adapt blocks.*.attn.q lora rank=4\n}\n")
    second = slimfx.compile(first, "policy int8 {\n    quantize blocks.*.mlp.* : Linear int8\n}\n")
    third = slimfx.compile(second, "keep head")
    assert [(r.policy, [x.kind for x in r.rules]) for r in third.report.earlier] == [
        ("lora", ["adapt"]), ("int8", ["quantize"])]
    assert [x.kind for x in third.report.rules] == ["keep"] and first.report.earlier == ()
    text = str(third.report)
    assert "compiled before with policy lora: adapt blocks.*.attn.q lora rank=4" in text
    assert "compiled before with policy int8: quantize blocks.*.mlp.* : Linear int8" in text
    third.save(tmp_path / "a")
    assert slimfx.load(tmp_path / "a").report == third.report


@pytest.mark.parametrize("rule", ["adapt blocks.*.attn.q lora rank=2", "quantize blocks.*.attn.q int8"])
def test_a_linear_an_earlier_compile_quantized_is_refused_at_the_rule(rule):
    """Its packed weight is no linear's weight: binding it raised an IndexError from the estimate."""
    first = slimfx.compile(tiny("llama"), "quantize blocks.*.** : Linear int4 group=32")
    with pytest.raises(SpecError) as e:
        slimfx.compile(first, rule)
    assert e.value.kind == "unsupported" and e.value.line == 1
    assert "model.layers.0.self_attn.q_proj and 1 more: an earlier compile quantized it" in str(e.value)
    assert "QLoRA: `quantize …` then `adapt …` in one policy" in str(e.value)
    assert [r.kind for r in slimfx.compile(first, "drop blocks[0]").report.rules] == ["drop"]


@pytest.mark.parametrize("second", ["quantize ** : Linear int8", "adapt ** : Linear lora rank=4"])
def test_a_quantized_linear_that_kept_its_bias_is_refused_too(second):
    """Its bias left it a parameter, so it was not seen as packed: the estimate took the bias for
    the weight, an IndexError (Qwen2's q/k/v, OPT, GPT-2 and BERT have biases)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    first = slimfx.compile(model, "quantize ** : Linear int4 group=32", example_inputs={"input": torch.randn(2, 64)})
    with pytest.raises(SpecError) as e:
        slimfx.compile(first, second)
    assert e.value.kind == "unsupported" and "an earlier compile quantized it" in str(e.value)


def test_keep_only_policy_compiles_and_reports():
    loaded = tiny("llama")
    cm = slimfx.compile(loaded, "policy p {\n    keep head\n}\n")
    assert [r.kind for r in cm.report.rules] == ["keep"]
    assert cm.report.rules[0].targets == ("lm_head",)
    assert "keep head" in str(cm.report)


def test_example_inputs_are_required_for_a_plain_module():
    with pytest.raises(TypeError, match="example_inputs"):
        slimfx.compile(tiny("llama").model, "")


def test_bad_backend_and_triton_without_a_gpu(monkeypatch):
    loaded = tiny("llama")
    with pytest.raises(ValueError, match="backend must be one of"):
        slimfx.compile(loaded, "", backend="cuda")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the Triton backend runs (tests/codegen/test_lower.py)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend=\"triton\" runs generated kernels on a CUDA GPU.*TRITON_INTERPRET=1"):
        slimfx.compile(loaded, "", backend="triton")


def test_triton_interpret_set_after_triton_was_imported_is_refused_and_its_other_spellings_are_taken(monkeypatch):
    """TRITON_INTERPRET=1 set after transformers had imported triton: compile said yes, then every
    call raised "Cannot call @triton.jit'd outside of the scope of a kernel"; and `true`, which
    turns Triton's interpreter on, was refused."""
    import triton.language as tl

    from slimfx.runtime.lower import BackendUnavailable

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the Triton backend runs (tests/codegen/test_lower.py)")
    lm = tiny("llama", layers=1)
    monkeypatch.setenv("TRITON_INTERPRET", "true")  # this process imported triton with the interpreter on
    slimfx.compile(lm, "keep head", backend="triton")
    monkeypatch.setattr(tl.standard, "sigmoid", tl.standard.sigmoid.fn)  # as if jitted without it
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET was set after triton was imported"):
        slimfx.compile(lm, "keep head", backend="triton")


def test_loading_for_triton_without_a_gpu_says_so_not_that_the_artifact_is_from_another_version(tmp_path,
                                                                                               monkeypatch):
    """It was wrapped as "cannot be restored (RuntimeError: … interpreter (sl); it was saved by …
    torch 2.13.0+cpu, this is torch 2.13.0+cpu: load it there or …"."""
    from slimfx.runtime.lower import BackendUnavailable

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the Triton backend runs (tests/codegen/test_lower.py)")
    slimfx.compile(tiny("llama"), "quantize blocks.*.** : Linear int8").save(tmp_path / "a")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable) as e:
        slimfx.load(tmp_path / "a", backend="triton")
    assert 'load with backend="auto"' in str(e.value) and "saved by" not in str(e.value)


def test_triton_without_a_gpu_is_refused_before_any_work_and_leaves_a_model_as_it_was(monkeypatch):
    """compile() refused it after the whole pipeline (GPTQ and calibration lost); a failed
    set_backend("triton") had already taken the CPU kernels away (backend still said "auto")."""
    from slimfx.runtime.lower import BackendUnavailable

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the Triton backend runs (tests/codegen/test_lower.py)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lm = tiny("llama")
    import slimfx.api as api_module
    monkeypatch.setattr(api_module, "_capture", lambda *a: pytest.fail("captured before refusing"))
    with pytest.raises(BackendUnavailable):
        slimfx.compile(lm, "quantize blocks.*.** : Linear int4 group=32", backend="triton")
    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cm = slimfx.compile(lm, "quantize blocks.*.** : Linear int4 group=32")
    before = str(cm.lowering)
    with torch.no_grad():
        want = cm(**lm.example_inputs).logits
    with pytest.raises(BackendUnavailable):
        cm.set_backend("triton")
    assert cm.backend == "auto" and str(cm.lowering) == before and "int4pack" in before
    with torch.no_grad():
        assert torch.equal(cm(**lm.example_inputs).logits, want)


def test_a_policy_object_with_another_name_is_refused():
    """name= was ignored when the policy was a Policy: the one given ran, whatever name said."""
    policy = slimfx.parse("policy a {\n    quantize head int8\n}\n").policies[0]
    with pytest.raises(SpecError, match="no policy `b`: the Policy given is `a`"):
        slimfx.plan(tiny("llama"), policy, name="b")
    assert slimfx.plan(tiny("llama"), policy, name="a").policy.name == "a"


def test_a_policy_given_without_rules_warns_and_the_default_does_not(tmp_path):
    """An emptied policy file compiled the model unchanged without a word (`slimfx compile`
    refuses it); leaving the policy out is how the model is captured alone."""
    import warnings

    empty = tmp_path / "empty.slim"
    empty.write_text("# nothing yet\n")
    lm = tiny("llama")
    for policy, says in ((empty, f"the policy ({empty}) has no rules"), ("policy p {}", "policy `p` has no rules"),
                         ("# a comment", "the policy has no rules")):
        with pytest.warns(UserWarning, match=re.escape(says) + ": the compiled model computes what the original does"):
            slimfx.compile(lm, policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimfx.compile(lm)
        slimfx.compile(lm, "")


def test_a_policy_passed_alone_shows_its_errors_in_its_own_text(tmp_path):
    """The Policy kept no text: its errors printed `<policy>:3:14` over an empty line and a caret
    at nothing, whatever file it was parsed from."""
    path = tmp_path / "edge.slim"
    path.write_text("policy a {\n    keep head\n    quantize blocks.*.attn.nope int8\n}\n")
    for policy in (slimfx.parse_file(path).policies[0], slimfx.parse(path.read_text()).policies[0]):
        with pytest.raises(SpecError, match="matches nothing") as info:
            slimfx.compile(tiny("llama"), policy)
        lines = str(info.value).splitlines()
        assert lines[0].startswith(f"{policy.filename}:3:14: error[selector]")
        assert lines[1:3] == ["        quantize blocks.*.attn.nope int8", " " * 17 + "^" * 18]
    assert slimfx.parse_file(path).policies[0].filename == str(path)


def test_an_error_without_policy_text_shows_no_empty_line():
    from slimfx.dsl.errors import Diagnostic

    assert Diagnostic("selector", "matches nothing", 1, 14).render("") == "<policy>:1:14: error[selector]: matches nothing"


@pytest.mark.parametrize("name", [3, ["a"]])
def test_a_name_that_is_no_string_is_a_type_error(name):
    """It was an AttributeError from inside the "did you mean" of the policy names ('int' object
    has no attribute 'lower'), in compile, plan and check_policy alike."""
    with pytest.raises(TypeError, match=r"name= is the name of a policy in the file \(a string\), not the"):
        slimfx.plan(tiny("llama"), "policy a {\n    keep head\n}\n", name=name)


@pytest.mark.parametrize("as_policy", [False, True])
def test_a_spec_parsed_without_its_checks_is_checked_before_compiling(as_policy):
    """parse(…, check=False) skips the checks across rules; compile ran such a Spec's `drop` after
    its `quantize` as written."""
    spec = slimfx.parse("policy a {\n    quantize head int8\n    drop blocks[0]\n}\n", check=False)
    with pytest.raises(SpecError, match="`drop` after `quantize`") as info:
        slimfx.compile(tiny("llama"), spec.policies[0] if as_policy else spec)
    assert info.value.kind == "illegal-order" and info.value.line == 3


def test_of_a_spec_parsed_without_its_checks_only_the_policy_that_runs_is_checked():
    """The whole Spec was checked: a problem in another policy refused the one asked for."""
    text = "policy p {\n    quantize head int8\n    drop blocks[0]\n}\npolicy ok {\n    quantize head int8\n}\n"
    spec = slimfx.parse(text, check=False, filename="two.slim")
    assert slimfx.plan(tiny("llama"), spec, name="ok").policy.name == "ok"
    with pytest.raises(SpecError, match="`drop` after `quantize`") as info:
        slimfx.plan(tiny("llama"), spec, name="p")
    assert str(info.value).startswith("two.slim:3:5: error[illegal-order]") and "drop blocks[0]" in str(info.value)


def test_a_model_that_is_not_a_module_is_named():
    """compile("llama", …, example_inputs=…) was an AttributeError: 'str' object has no attribute 'forward'."""
    with pytest.raises(TypeError, match=r"not the str 'llama': load it first, e.g. slimfx.models.load\('llama'\)"):
        slimfx.compile("llama", "", example_inputs=tiny("llama").example_inputs)
    with pytest.raises(TypeError, match="compiles a torch.nn.Module .* not the NoneType"):
        slimfx.plan(None, "")


def test_a_model_on_the_meta_device_is_refused_before_capture():
    """quantize failed deep in a pass (Tensor.item() on meta tensors); other policies returned a
    model whose outputs were meta tensors and which could not be saved."""
    lm = tiny("llama")
    with torch.device("meta"):
        empty = type(lm.model)(lm.model.config)
    for policy in ("quantize blocks.*.mlp.* : Linear int8", "keep head"):
        with pytest.raises(TypeError, match=r"tensors are on the meta device \(e\.g\. model\.embed_tokens.*to_empty"):
            slimfx.compile(empty, policy, example_inputs=lm.example_inputs)


def test_second_compile_of_the_same_model_reuses_the_capture():
    from slimfx.passes.capture_cache import cache_info

    clear_cache()
    loaded = tiny("gpt2")
    slimfx.compile(loaded, "")
    slimfx.compile(loaded, "")
    info = cache_info()
    assert info["hits"] >= 1 and info["misses"] == 1


def test_policy_file_and_name_errors_have_kinds_of_their_own(tmp_path):
    loaded = tiny("llama")
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, str(tmp_path / "missing.slim"))
    assert e.value.kind == "no-file" and "missing.slim" in e.value.message
    two = tmp_path / "two.slim"
    two.write_text("policy a {\n    keep head\n}\npolicy b {\n    keep embed\n}\n")
    for name in (None, "c"):
        with pytest.raises(SpecError) as e:
            slimfx.compile(loaded, str(two), name=name)
        assert e.value.kind == "unknown-policy" and "a, b" in e.value.message
        # a name that was given is not answered "pass name=… to choose one"
        assert e.value.hint == ("use one of the names it lists" if name else "pass name=… (or --policy NAME) to choose one")
    with pytest.raises(SpecError) as e:
        slimfx.compile(loaded, str(_near(tmp_path)), name="fast_polcy")
    assert e.value.hint == "did you mean `fast_policy`?"


def _near(tmp_path):
    near = tmp_path / "near.slim"
    near.write_text("policy fast_policy {\n    keep head\n}\npolicy slow {\n    keep embed\n}\n")
    return near


def test_a_bare_tensor_of_example_inputs_is_the_first_input_not_rows():
    loaded = tiny("llama")
    ids = loaded.example_inputs["input_ids"]
    cm = slimfx.compile(loaded.model, "", example_inputs=ids)
    assert cm.input_names == ("input_ids",)
    with torch.no_grad():
        assert torch.equal(cm(ids).logits, loaded.model(ids).logits)


def test_a_plan_prints_as_the_table_slimfx_plan_prints():
    """print(slimfx.plan(...)) gave the dataclass repr of every bound rule (64 KB on SmolLM2)."""
    plan = slimfx.plan(tiny("llama"), "quantize blocks.*.attn.q int8")
    shown = str(plan)
    assert "slimfx plan: policy inline on LlamaForCausalLM" in shown and "ready; ≈8.25 bits/weight" in shown
    assert repr(plan) == "<Plan: policy inline on LlamaForCausalLM, 1 rule; print() it for the table>"
    assert len(plan.rules) == 1 and plan.rules[0].targets  # still the Plan, every field


def test_a_model_compiled_or_loaded_under_inference_mode_trains_and_loads_state(tmp_path):
    """Under torch.inference_mode every tensor made is an inference tensor: the adapters of a
    model compiled or loaded in a serving process's inference scope could not train (raw torch
    errors at the first step) nor load a state dict."""
    lm = tiny("llama", layers=1)
    batch = lm.encode(["a few words to train on", "and a few more"])
    with torch.inference_mode():
        cm = slimfx.compile(lm, "adapt blocks.*.attn.{q,v} lora rank=4")
    assert not any(t.is_inference() for t in cm.state_dict().values())
    assert all(p.requires_grad for p in cm.adapter_parameters())
    cm.save(tmp_path / "a")
    with torch.inference_mode():
        back = slimfx.load(tmp_path / "a")
    for model in (cm, back):
        model.load_state_dict(model.state_dict())
        slimfx.train(model, [batch], steps=1)


def test_the_heap_is_handed_back_after_the_kernels_conversion(monkeypatch, tmp_path):
    """Converting packed weights for the CPU kernels frees int32 temporaries into glibc's heap:
    SmolLM2 with int4 MLPs ended compile() at 1,030 MiB RSS, 653 MiB once handed back."""
    from slimfx.runtime import compiled, heap

    events = []
    real_init, real_trim = compiled.CompiledModel.__init__, heap.return_freed_heap
    monkeypatch.setattr(compiled.CompiledModel, "__init__",
                        lambda self, *a, **k: (real_init(self, *a, **k), events.append("built"))[0])
    monkeypatch.setattr(heap, "return_freed_heap", lambda: (real_trim(), events.append("trimmed"))[0])
    lm = tiny("llama", layers=1)
    cm = slimfx.compile(lm, "quantize blocks.*.mlp.* int4")
    assert events[-2:] == ["built", "trimmed"]
    cm.save(tmp_path / "a")
    events.clear()
    slimfx.load(tmp_path / "a")
    assert events[-2:] == ["built", "trimmed"]
