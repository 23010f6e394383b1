"""compile() / plan(): the empty policy is the identity on every architecture, the user's model is
never touched, compiled models compile again, and unimplemented rules are refused, never skipped.
How the policy argument is read: test_api_policy.py."""
import pytest
import torch

import slimfx
from slimfx import SpecError
from slimfx.models import TINY_ARCHS, tiny
from slimfx.passes.capture_cache import clear_cache


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
