"""CompiledModel: called like the original model, owning the graph's weights, with clear errors
for wrong inputs. Bit-identity with the original, per architecture, is in test_every_arch.py."""
from __future__ import annotations

import pytest
import torch

from runtime_tiny import assert_identical, compiled
from slimfx.runtime.compiled import CompiledModel
from slimfx.runtime.report import Report


def test_positional_and_keyword_calls_agree():
    case = compiled("llama")
    x = case.loaded.example_inputs
    assert_identical(case.cm(x["input_ids"], x["attention_mask"]), case.cm(**x))
    assert_identical(case.cm(x["input_ids"], attention_mask=x["attention_mask"]), case.cm(**x))


def test_inputs_by_position_bind_as_the_original_forward_names_them(tmp_path):
    """The graph's inputs follow the example's order; a BERT example of ids, token_type_ids and
    mask made `cm(ids, mask)` pass the mask as token_type_ids (BERT's forward takes input_ids,
    attention_mask, token_type_ids): wrong embeddings, no error. Positions follow forward's
    signature now, through save/load and a second compile too."""
    import slimfx
    from slimfx.models import tiny

    lm = tiny("bert")
    ids = lm.example_inputs["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    example = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}
    cm = slimfx.compile(lm.model, "keep embed", example_inputs=example)
    assert cm.input_names == ("input_ids", "token_type_ids", "attention_mask")
    with torch.no_grad():
        want = lm.model(ids, mask).last_hidden_state
    cm.save(tmp_path / "a")
    for model in (cm, slimfx.load(tmp_path / "a"), slimfx.compile(cm, "keep embed")):
        assert torch.equal(model(ids, mask).last_hidden_state, want)
        assert torch.equal(model(ids, mask, None).last_hidden_state, want)  # None where HF allows it
    with pytest.raises(TypeError, match="position 3 is the original forward's `position_ids`, which the graph"):
        cm(ids, mask, None, torch.arange(ids.shape[1]))


@pytest.mark.parametrize("call, words", [
    (lambda cm, x: cm(attention_mask=x["attention_mask"]), ["missing ['input_ids']"]),
    (lambda cm, x: cm(**x, labels=x["input_ids"]), ["unexpected ['labels']"]),
    (lambda cm, x: cm(x["input_ids"], input_ids=x["input_ids"], attention_mask=x["attention_mask"]),
     ["given twice ['input_ids']"]),
    (lambda cm, x: cm(*x.values(), x["input_ids"]), ["position 2 is the original forward's `position_ids`"]),
])
def test_wrong_inputs_name_the_expected_ones(call, words):
    case = compiled("llama")
    with pytest.raises(TypeError) as e:
        call(case.cm, case.loaded.example_inputs)
    message = str(e.value)
    assert "['input_ids', 'attention_mask']" in message
    for w in words:
        assert w in message


def test_an_input_of_another_rank_is_named_with_its_shape():
    """1-D input_ids were reported as "missing ['attention_mask']" (nothing to size a mask by)."""
    case = compiled("llama")
    ids = case.loaded.example_inputs["input_ids"]
    with pytest.raises(TypeError) as e:
        case.cm(input_ids=ids[0])
    assert (f"input_ids is 1-D [{ids.shape[1]}], the graph takes it 2-D [batch, seq]; add the batch dimension, "
            "e.g. input_ids.unsqueeze(0)") in str(e.value)
    with pytest.raises(TypeError, match=r"attention_mask is 3-D \[1, 2, \d+\], the graph takes it 2-D"):
        case.cm(input_ids=ids, attention_mask=torch.ones(1, *ids.shape))
    assert_identical(case.cm(input_ids=ids[:1]), case.cm(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1])))


def test_a_dim_the_capture_fixed_is_named_with_the_size_it_takes():
    """A ViT image of another side than the example's was the graph's guard, a bare AssertionError
    ("Guard failed: pixel_values.size()[2] == 32")."""
    case = compiled("vit")
    pixels = case.loaded.example_inputs["pixel_values"]
    side = pixels.shape[-1]
    with pytest.raises(ValueError, match=rf"pixel_values is \[1, 3, {2 * side}, {2 * side}\], the graph takes "
                                         rf"\[batch, 3, {side}, {side}\]: dims 2, 3 were fixed at capture"):
        case.cm(pixel_values=torch.randn(1, 3, 2 * side, 2 * side))
    case.cm(pixel_values=torch.randn(5, 3, side, side))  # the batch still varies


def test_weights_are_the_graphs():
    """parameters()/state_dict() are the graph module's own tensors, under `program.`."""
    cm = compiled("gpt2").cm
    gm = cm.graph.module
    assert cm.program is gm
    assert [id(p) for p in cm.parameters()] == [id(p) for p in gm.parameters()]
    keys = list(cm.state_dict())
    assert keys == [f"program.{k}" for k in gm.state_dict()]
    assert "program.transformer.wte.weight" in keys
    # Tied weights (lm_head = wte) count once in the byte total.
    distinct = {p.data_ptr(): p.numel() * p.element_size() for p in gm.parameters()}
    assert cm.weight_bytes() == sum(distinct.values())


def test_attributes_and_modes():
    cm = compiled("bert").cm
    assert cm.report.policy == "tiny" and cm.policy_name == "tiny"
    assert cm.policy_text.startswith("policy tiny")
    assert cm.input_names == tuple(i.name for i in cm.graph.inputs)
    assert not cm.training
    assert cm.train() is cm and cm.training and cm.program.training
    cm.eval()
    assert not cm.training and not cm.program.training
    text = repr(cm)
    assert text.startswith("CompiledModel(BertModel, policy tiny") and "\n" not in text


def test_defaults():
    graph = compiled("vit").cm.graph
    cm = CompiledModel(graph, report=Report(None, graph.model_class))
    assert cm.policy_text == "" and cm.policy_name is None
    assert "(empty policy)" in repr(cm)
    x = compiled("vit").loaded.example_inputs
    assert_identical(cm(**x), compiled("vit").cm(**x))


def test_weights_are_frozen_and_grad_flows_once_unfrozen():
    """Compiled weights are frozen (a plain call takes the fast kernels); a user who unfreezes
    them trains through the graph."""
    case = compiled("llama")
    assert not any(p.requires_grad for p in case.cm.parameters())
    case.cm.requires_grad_(True)
    out = case.cm(**case.loaded.example_inputs)
    out.logits.sum().backward()
    grads = [p.grad for p in case.cm.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    case.cm.zero_grad(set_to_none=True)
    case.cm.requires_grad_(False)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_mask_or_ids_of_another_dtype_are_taken_as_the_original_model_takes_them(arch):
    """A bool, int32 or float mask raised export's bare "Tensor dtype mismatch! Expected: Long"."""
    case = compiled(arch)
    x = case.loaded.example_inputs
    mask = x["attention_mask"].clone()
    mask[0, -3:] = 0  # padding, so that the mask's values matter
    want = case.cm(input_ids=x["input_ids"], attention_mask=mask)
    for other in (mask.bool(), mask.int(), mask.float()):
        assert_identical(case.cm(input_ids=x["input_ids"], attention_mask=other), want)
    assert_identical(case.cm(input_ids=x["input_ids"].int(), attention_mask=mask), want)
    with pytest.raises(TypeError, match="attention_mask is torch.float32 with values that are not whole numbers"):
        case.cm(input_ids=x["input_ids"], attention_mask=mask.float() * 0.5)


@pytest.mark.parametrize("cast", [lambda cm: cm.half(), lambda cm: cm.bfloat16(), lambda cm: cm.double(), lambda cm: cm.to(torch.float16),
                                  lambda cm: cm.to("cpu", torch.bfloat16), lambda cm: cm.type(torch.float16)])
def test_a_dtype_cast_is_refused_and_says_to_cast_the_original(cast):
    """cm.half() returned a model that failed on every call; int4 scales are fp16 beside uint8 codes."""
    case = compiled("llama")
    before = {n: t.dtype for n, t in case.cm.state_dict().items()}
    with pytest.raises(TypeError, match="keeps the dtypes it was compiled in; cast the original model"):
        cast(case.cm)
    assert {n: t.dtype for n, t in case.cm.state_dict().items()} == before
    assert case.cm.to("cpu") is case.cm  # a device alone is a move


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()])
def test_a_cast_of_a_module_that_holds_it_is_refused_too(cast):
    """nn.Sequential(cm).half() went past cm.half(): its fp16 scales and fp32 weights were cast,
    every call then failed, and casting back left it computing other numbers."""
    case = compiled("llama")
    before = {n: t.clone() for n, t in case.cm.state_dict().items()}
    with pytest.raises(TypeError, match="by a module that holds it.*keeps the dtypes it was compiled in"):
        cast(torch.nn.Sequential(case.cm))
    after = case.cm.state_dict()
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())


def test_a_parents_cast_to_its_own_dtype_keeps_every_tensors_dtype():
    """A parent's `.float()` on a float32 model: its fp16 scales stay fp16, the outputs the same."""
    import slimfx
    from slimfx.models import tiny

    lm = tiny("llama")
    cm = slimfx.compile(lm.model, "quantize blocks.*.mlp.* int4", example_inputs=lm.example_inputs)
    with torch.no_grad():
        want = cm(**lm.example_inputs).logits
    dtypes = {n: t.dtype for n, t in cm.state_dict().items()}
    assert torch.float16 in dtypes.values()  # the int4 scales
    torch.nn.Sequential(cm).float().to("cpu")
    assert {n: t.dtype for n, t in cm.state_dict().items()} == dtypes
    with torch.no_grad():
        assert torch.equal(cm(**lm.example_inputs).logits, want)


def test_a_cast_to_the_models_own_dtype_changes_nothing():
    """`model.to(device, torch.float32)` on a float32 model was refused like a real cast."""
    import slimfx
    from slimfx.models import tiny

    case = compiled("llama")
    assert case.cm.dtype == torch.float32
    for same in (lambda cm: cm.float(), lambda cm: cm.to(torch.float32), lambda cm: cm.to("cpu", torch.float32),
                 lambda cm: cm.to(device="cpu", dtype=torch.float32), lambda cm: cm.type(torch.float32)):
        assert same(case.cm) is case.cm
    lm = tiny("llama")
    half = slimfx.compile(lm.model.half(), "quantize blocks.*.mlp.* : Linear int8", example_inputs=lm.example_inputs)
    assert half.dtype == torch.float16 and half.half() is half
    with pytest.raises(TypeError, match="keeps the dtypes it was compiled in"):
        half.float()


def test_a_half_model_whose_first_output_is_a_float32_loss_computes_in_its_own_dtype():
    """With `labels`, a Hugging Face model's first output is its loss, in float32: a bf16 model
    read as float32, `.float()` passed silently and its own `.bfloat16()` was refused."""
    import slimfx
    from slimfx.models import tiny

    lm = tiny("llama")
    ids = lm.example_inputs["input_ids"]
    cm = slimfx.compile(lm.model.to(torch.bfloat16), example_inputs={**lm.example_inputs, "labels": ids})
    assert cm(**lm.example_inputs, labels=ids).loss.dtype == torch.float32
    assert cm.dtype == torch.bfloat16 and cm.bfloat16() is cm
    with pytest.raises(TypeError, match="keeps the dtypes it was compiled in"):
        cm.float()


def test_deepcopy_is_independent_and_pickling_says_to_save(tmp_path):
    """deepcopy reached export's fake tensors ("Cannot access data pointer"); pickle and
    torch.save(cm) failed on a local lambda, or on a loaded model with an fx TraceError."""
    import copy
    import io
    import pickle

    import slimfx
    from slimfx.models import tiny

    lm = tiny("llama")
    x = lm.example_inputs
    cm = slimfx.compile(lm.model, "quantize blocks.*.mlp.* : Linear int4 group=16\nadapt blocks.*.attn.q lora rank=2",
                        example_inputs=x).train()
    cm.save(tmp_path / "a")
    for model in (cm, slimfx.load(tmp_path / "a")):
        twin = copy.deepcopy(model)
        assert twin.training == model.training and twin.backend == model.backend
        assert [p.requires_grad for p in twin.parameters()] == [p.requires_grad for p in model.parameters()]
        model.eval(), twin.eval()
        with torch.no_grad():
            assert torch.equal(twin(**x).logits, model(**x).logits)
            next(p for n, p in twin.named_parameters() if n.endswith("lora_B")).add_(1.0)  # its own tensors
            assert not torch.equal(twin(**x).logits, model(**x).logits)
        for dump in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
            with pytest.raises(TypeError, match=r"is not pickled .* save it with cm.save\(dir\)"):
                dump(model)


def test_a_flag_the_graph_was_captured_with_may_be_repeated_and_another_is_refused_with_how(tmp_path):
    """use_cache=False (which capture sets itself) was refused as an unexpected input, with advice
    to recompile with other tensors, which could not help."""
    import slimfx
    from slimfx.models import tiny

    lm = tiny("llama")
    ids = lm.example_inputs["input_ids"]
    cm = slimfx.compile(lm.model, "keep head", example_inputs=dict(lm.example_inputs, output_hidden_states=True))
    cm.save(tmp_path / "a")
    for model in (cm, slimfx.load(tmp_path / "a")):
        want = lm.model(ids).logits
        assert torch.equal(model(ids, use_cache=False, output_hidden_states=True).logits, want)
        # None: the default it was captured with (output_hidden_states, set away from the config's,
        # must be given: tests/runtime/test_call_inputs_flags.py)
        assert torch.equal(model(ids, output_attentions=None, output_hidden_states=True).logits, want)
        with pytest.raises(TypeError, match="captured with output_hidden_states=True, which the graph has fixed; "
                                            "output_hidden_states=False needs another graph: compile with"):
            model(ids, output_hidden_states=False)
        with pytest.raises(TypeError, match=r"captured with return_dict=True \(the model's default\).* compile with example_inputs that "
                                            "include return_dict=False"):
            model(ids, return_dict=False, output_hidden_states=True)
        with pytest.raises(TypeError, match="runs without a KV cache"):
            model(ids, use_cache=True, output_hidden_states=True)


def test_inputs_the_graph_cannot_run_are_named_not_raised_from_inside_it():
    """None ids (AttributeError in the graph), a mask of another length (a guard's AssertionError),
    no tokens (a reshape of 0 elements), more positions than the model has (a guard again)."""
    case = compiled("bert")
    ids = case.loaded.example_inputs["input_ids"]
    mask = torch.ones_like(ids)
    with pytest.raises(TypeError, match=r"input_ids is NoneType, the graph takes a tensor \[batch, seq\] of torch.int64"):
        case.cm(input_ids=None, attention_mask=mask)
    # Without the mask, which is filled from the ids: a numpy array or a list was reported as a
    # missing attention_mask (the fill could not size one from it).
    for value, kind in ((ids.numpy(), "ndarray"), (ids.tolist(), "list")):
        with pytest.raises(TypeError, match=rf"input_ids is {kind}, the graph takes a tensor \[batch, seq\] of "
                                            r"torch.int64 \(torch.as_tensor\(...\) makes one\)"):
            case.cm(input_ids=value)
    with pytest.raises(ValueError, match=r"disagree in size: input_ids \[2, \d+\], attention_mask \[2, \d+\]"):
        case.cm(ids, mask[:, :-1])
    with pytest.raises(ValueError, match=r"input_ids is \[2, 0\], with no tokens"):
        case.cm(ids[:, :0])
    longest = case.loaded.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"does not take inputs of these sizes: input_ids \[1, {longest + 1}\].*"
                                         rf"at most {longest} — the graph keeps the limits"):
        case.cm(torch.ones(1, longest + 1, dtype=torch.long))


@pytest.mark.parametrize("arch, table", [("gpt2", "transformer.wpe holds 128 rows"),
                                         ("opt", "model.decoder.embed_positions holds 130 rows")])
def test_more_positions_or_ids_than_the_tables_hold_are_named(arch, table):
    """GPT-2 and OPT index their position table with no guard before it: an IndexError ("index
    out of range in self") from inside the graph; so do token ids past the vocabulary."""
    case = compiled(arch)
    longest = case.loaded.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"past the end of one of its embedding tables \(.*{table}.*\) with inputs "
                                         rf"input_ids \[1, {longest + 1}\]"):
        case.cm(torch.ones(1, longest + 1, dtype=torch.long))
    vocab = case.loaded.model.config.vocab_size
    with pytest.raises(ValueError, match="token ids below its vocabulary size"):
        case.cm(torch.full((1, 4), vocab, dtype=torch.long))


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_a_mask_of_one_row_stands_for_every_row_as_the_original_takes_it(arch):
    """A [1, seq] attention_mask beside [batch, seq] ids: the compiled graph indexed past its one
    row (an IndexError); it now applies to every row, as the mask expanded to the batch does."""
    case = compiled(arch)
    ids = torch.randint(3, 200, (3, 6))
    with torch.no_grad():
        for row in ([1] * 6, [1, 1, 1, 1, 0, 0]):  # the original takes the first (a mask of ones it skips)
            mask = torch.tensor([row])
            want = case.loaded.model(input_ids=ids, attention_mask=mask.expand(3, 6))[0]
            got = case.cm(input_ids=ids, attention_mask=mask)[0]
            real = mask.expand(3, 6).bool()
            torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_a_half_model_under_autocast_to_the_other_half_dtype_is_refused_by_name():
    """It raised a bare 'Tensor dtype mismatch! Expected: Half, Got: float' from the graph's
    metadata asserts; its own dtype, and an fp32 model, run under autocast."""
    import slimfx
    from slimfx.models import tiny

    for dtype, other in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)):
        lm = tiny("llama")
        lm.model.to(dtype)
        cm = slimfx.compile(lm, "")
        with torch.no_grad():
            with torch.autocast("cpu", dtype=other), pytest.raises(TypeError, match=rf"computes in {dtype}, and the "
                                                                                   rf"call is under torch.autocast to {other}"):
                cm(**lm.example_inputs)
            with torch.autocast("cpu", dtype=dtype):  # transformers 5.17's rotary too (passes/autocast_regions.py)
                assert torch.equal(cm(**lm.example_inputs).logits, lm.model(**lm.example_inputs).logits)


def test_a_graph_whose_dtypes_autocast_changes_is_refused_by_name(monkeypatch):
    """A region of the model's own code that changes autocast in a way capture does not keep (one
    that turns it off around other ops than matmuls): under the caller's autocast every call
    raised a bare "Tensor dtype mismatch! Expected: Float, Got: c10::Half" from the graph's checks."""
    import slimfx
    from slimfx.models import tiny

    lm = tiny("llama", layers=1)
    cm = slimfx.compile(lm, "")

    def mismatch(*_):
        raise RuntimeError("Tensor dtype mismatch! Expected: Float, Got: c10::Half")

    monkeypatch.setattr(cm.program, "forward", mismatch)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16), pytest.raises(TypeError) as e:
            cm(**lm.example_inputs)
        assert "cannot run under torch.autocast" in str(e.value) and "Call it outside autocast" in str(e.value)
        with pytest.raises(RuntimeError, match="^Tensor dtype mismatch"):  # outside autocast: not this
            cm(**lm.example_inputs)


def test_a_model_that_casts_a_linears_output_itself_is_refused_under_autocast_saying_so():
    """Gemma2's norms `.float()` a linear's output: a no-op at capture, a bf16 value under autocast.
    The refusal blamed the model changing autocast, which it does not."""
    import transformers as T

    import slimfx

    torch.manual_seed(0)
    model = T.Gemma2ForCausalLM(T.Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8)).eval()
    x = {"input_ids": torch.randint(0, 128, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    cm = slimfx.compile(model, "", example_inputs=x)
    with torch.no_grad():
        assert torch.equal(cm(**x).logits, model(**x).logits)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError) as e:
            cm(**x)
    assert "a `.float()` on a linear's output (Gemma2's norms)" in str(e.value)
