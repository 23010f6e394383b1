"""The lowering (codegen/lower.py) and `backend="triton"`: fusion groups replaced by calls of their
generated kernels, run through Triton's interpreter without a GPU, against the eager graph —
random graphs (hypothesis) and whole tiny models (int4/int8/int2 + LoRA); save/load regenerates
the kernels; training on the Triton backend; the refusals."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, settings
from torch import fx

import slimfx
from slimfx.codegen.lower import lower_graph
from slimfx.codegen.ops import kind_of
from slimfx.models import tiny

from graphs import D, capture, programs

aten = torch.ops.aten
GEMMS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default,
         torch.ops.slimfx.quant_linear.default}


def _calls(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and hasattr(n.target, "kernel")]


# Found by the random (dev) profile: layer_norm of near-constant rows (exp∘tanh of a softmax)
# divides float32 rounding by a std of ~3e-3, so eager itself is off by ~1e-4 there.
ILL_CONDITIONED = [("linear", (0,)), ("amax", (0,)), ("exp_tanh", (2,)), ("add", (1, 2)), ("exp_tanh", (0,)),
                   ("sub", (1, 4)), ("softmax", (0,)), ("exp_tanh", (0,)), ("layer_norm", (6,)), ("exp_tanh", (0,))]


def _assert_as_accurate_as_eager(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor) -> None:
    """The kernels' float32 result is within 3e-5 of eager's, or — where the graph amplifies
    rounding (eager's own error against float64 is larger) — no more than twice eager's error
    away from the float64 result."""
    eager_error = float((want.double() - exact).abs().max())
    if eager_error < 1e-5:
        torch.testing.assert_close(got, want, atol=3e-5, rtol=3e-5)
    else:
        assert float((got.double() - exact).abs().max()) <= 2 * eager_error + 3e-5


@settings(max_examples=12, deadline=None)
@given(programs())
@example(ILL_CONDITIONED)
def test_random_graphs_lowered_to_kernels_equal_eager(steps):
    gm, x = capture(steps)
    reference = [(n.name, n.target) for n in gm.graph.nodes]
    new, summary = lower_graph(gm.graph)
    lowered = fx.GraphModule(gm, new)
    # Every group of these float32 graphs has a template: nothing is left to eager ops, and no
    # GEMM or pointwise op survives outside a kernel call.
    assert summary.eager == ()
    assert len(_calls(new)) == summary.kernels
    assert not [n for n in new.nodes if n.target in GEMMS or n.target in (aten.add.Tensor, aten.mul.Tensor)]
    x_other = torch.randn(5, D, generator=torch.Generator().manual_seed(2))  # another batch size
    exact = copy.deepcopy(gm).double()
    with torch.no_grad():
        for inp in (x, x_other):
            for got, want, ref in zip(lowered(inp), gm(inp), exact(inp.double())):
                _assert_as_accurate_as_eager(got, want, ref)
    assert [(n.name, n.target) for n in gm.graph.nodes] == reference  # the reference graph is left as it was


POLICIES = {
    "llama": "quantize blocks.*.** : Linear int4 group=16\nadapt blocks.*.attn.{q,v} lora rank=4 alpha=8 dropout=0.1",
    "bert": "quantize blocks.*.** : Linear int8",
    "qwen2": "quantize blocks.*.** : Linear int2 group=16 sym=false",
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("arch", sorted(POLICIES))
def test_tiny_models_on_the_triton_backend_equal_the_eager_backend(arch):
    lm = tiny(arch)
    eager = slimfx.compile(lm.model, POLICIES[arch], example_inputs=lm.example_inputs, backend="eager")
    cm = slimfx.compile(lm.model, POLICIES[arch], example_inputs=lm.example_inputs, backend="triton")
    codegen = cm.lowering.codegen
    # Every quantized linear (and LoRA's linears) runs in a generated GEMM — q/k/v as one kernel,
    # so at least 4 GEMM kernels per block (2 blocks) —; the norms in row kernels.
    assert dict(codegen.by_template)["gemm"] >= 8 and dict(codegen.by_template)["rows"] >= 4
    assert any("3 GEMMs reading one input" in text for _, text in codegen.listings)
    # every GEMM the templates take (transformers 5.17's rotary keeps a batched [1, d, 1] @ [1, 1, S]
    # matmul, opaque and left to eager ops there, as any batched matmul is)
    assert not [n for n in cm.program.graph.nodes if n.target in GEMMS and kind_of(n) == "anchor"]
    assert "Triton backend:" in str(cm.lowering) and "generated kernel calls" in repr(cm)
    # a cast to the device and dtype a value has is no op (Llama's `inv_freq.to(device)` kept its group eager)
    assert not [why for why, _ in codegen.eager if "aten.to." in why], codegen.eager
    with torch.no_grad():
        torch.testing.assert_close(_logits(cm(**lm.example_inputs)), _logits(eager(**lm.example_inputs)),
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_models_that_flatten_rows_run_on_the_triton_backend(arch):
    """GPT-2's Conv1D and OPT's layers run on [batch·sequence, D] rows: a kernel's output size
    batch·sequence is read off its input's, whose factors no input holds apart. Every call raised
    Unsupported("…'s shape uses ['s…', 's…'], which no input of the group has"), found by
    tests/test_compile_fuzz.py's rules with backend="triton"."""
    lm = tiny(arch)
    eager = slimfx.compile(lm.model, "", example_inputs=lm.example_inputs, backend="eager")
    cm = slimfx.compile(lm.model, "", example_inputs=lm.example_inputs, backend="triton")
    assert dict(cm.lowering.codegen.by_template)["gemm"] >= 4
    gen = torch.Generator().manual_seed(6)
    for batch, seq in ((2, 8), (3, 5), (1, 17)):
        inputs = {"input_ids": torch.randint(3, 200, (batch, seq), generator=gen),
                  "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
        with torch.no_grad():
            torch.testing.assert_close(_logits(cm(**inputs)), _logits(eager(**inputs)), atol=2e-5, rtol=2e-5)


def test_no_kernel_writes_a_value_only_exports_metadata_checks_read():
    """export puts an aten._assert_tensor_metadata beside each .to() of the model; a check that
    reads a value inside a group made the group write it out, so every Llama RMSNorm kernel wrote
    a second [rows, D] float32 tensor nobody used. The lowered graph drops the checks; the
    reference graph (eager, save) keeps them."""
    check = torch.ops.aten._assert_tensor_metadata.default
    lm = tiny("llama")
    cm = slimfx.compile(lm.model, "", example_inputs=lm.example_inputs, backend="triton")
    calls = [n for n in cm.program.graph.nodes if hasattr(n.target, "kernel")]
    assert not [n for n in cm.program.graph.nodes if n.target is check]
    rows = [n.target.kernel for n in calls if n.target.kernel.template == "rows"]
    assert len(rows) >= 5 and all(len(k.outputs) == 1 for k in rows), [len(k.outputs) for k in rows]
    assert all(g.users for n in calls for g in n.users)  # every output written is read
    cm.set_backend("eager")
    assert [n for n in cm.program.graph.nodes if n.target is check]


def test_save_and_load_regenerate_the_kernels_and_switching_backends(tmp_path):
    lm = tiny("llama", layers=1)
    cm = slimfx.compile(lm.model, POLICIES["llama"], example_inputs=lm.example_inputs, backend="triton")
    with torch.no_grad():
        before = _logits(cm(**lm.example_inputs))
    cm.save(tmp_path / "a")
    saved = (tmp_path / "a").rglob("*")
    assert not [p for p in saved if p.suffix == ".py"]  # an artifact never holds code
    loaded = slimfx.load(tmp_path / "a", backend="triton")
    assert loaded.lowering.codegen.kernels == cm.lowering.codegen.kernels
    with torch.no_grad():
        assert torch.equal(_logits(loaded(**lm.example_inputs)), before)
        loaded.set_backend("eager")
        assert loaded.lowering.codegen is None and [n for n in loaded.program.graph.nodes if n.target in GEMMS]
        eager = _logits(loaded(**lm.example_inputs))
        loaded.set_backend("triton")
        assert torch.equal(_logits(loaded(**lm.example_inputs)), before)
    torch.testing.assert_close(before, eager, atol=2e-5, rtol=2e-5)


def test_training_on_the_triton_backend_trains_the_reference_graph_and_keeps_the_kernels():
    lm = tiny("llama", layers=1)
    cm = slimfx.compile(lm.model, POLICIES["llama"], example_inputs=lm.example_inputs, backend="triton")
    calls = len(_calls(cm.program.graph))
    # A call that builds an autograd graph (outside no_grad: the adapters are trainable) runs the
    # reference graph, which has a backward (it raised "no backward" before, on a plain inference
    # call too); the kernels stay installed, and under no_grad they run.
    with torch.no_grad():
        kernels = _logits(cm(**lm.example_inputs))
    plain = _logits(cm(**lm.example_inputs))
    assert plain.requires_grad and len(_calls(cm.program.graph)) == calls
    torch.testing.assert_close(plain.detach(), kernels, atol=2e-5, rtol=2e-5)
    plain.sum().backward()
    assert all(p.grad is not None for p in cm.adapter_parameters())
    cm.zero_grad()
    result = slimfx.train(cm, [lm.example_inputs], steps=2, lr=1e-2)
    assert len(result.losses) == 2
    assert len(_calls(cm.program.graph)) == calls  # the kernels are back after training
    with torch.no_grad():
        trained = _logits(cm(**lm.example_inputs))
        cm.set_backend("eager")
        torch.testing.assert_close(trained, _logits(cm(**lm.example_inputs)), atol=2e-5, rtol=2e-5)


def test_train_mode_drops_adapter_inputs_on_the_triton_backend_as_on_eager():
    """cm.train() switched dropout on in the installed (lowered) graph only: the kernels compute
    adapters without dropout, and the reference graph that gradient calls run kept it off, so a
    hand-written training loop trained with `dropout=` ignored."""
    lm = tiny("llama", layers=1)
    policy = "quantize blocks.*.** : Linear int4 group=16\nadapt blocks.*.attn.{q,v} lora rank=4 alpha=8 dropout=0.5"
    cm = slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, backend="triton")
    calls = len(_calls(cm.program.graph))
    with torch.no_grad():
        for p in cm.adapter_parameters():
            p.fill_(0.1)  # B = 0 would hide the adapter path
        evaluated = _logits(cm(**lm.example_inputs))
    cm.train()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.manual_seed(0)
            a = _logits(cm(**lm.example_inputs))
            torch.manual_seed(1)
            b = _logits(cm(**lm.example_inputs))
        assert not torch.equal(a, b), f"a new dropout mask per call (grad enabled: {grad})"
    assert len(_calls(cm.program.graph)) == calls  # the kernels stay installed
    cm.eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(cm(**lm.example_inputs)), evaluated, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_lora_paths_are_fused_into_their_base_gemm(dtype):
    # Nonzero A and B (a fresh adapter's B is zero, which would hide a wrong rank path); rank 4
    # pads to tl.dot's 16. q and v carry adapters: q/k/v stay one kernel with both rank paths.
    # fp16 adapters: the kernel reads A and B through their casts up (eager ops before it).
    lm = tiny("llama", layers=1)
    policy = POLICIES["llama"] + f" dtype={dtype}"
    eager = slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, backend="eager")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in eager.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    cm = slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, backend="triton")
    cm.load_state_dict(eager.state_dict())
    codegen = cm.lowering.codegen
    # q/k/v (+2 LoRA paths), o, gate/up, down, head: no kernel of its own for any adapter linear.
    assert dict(codegen.by_template)["gemm"] == 5
    assert sum("xa" in text and "lora" in text for _, text in codegen.listings) == 1
    with torch.no_grad():
        got, want = _logits(cm(**lm.example_inputs)), _logits(eager(**lm.example_inputs))
        base = _logits(slimfx.compile(lm.model, "quantize blocks.*.** : Linear int4 group=16",
                                      example_inputs=lm.example_inputs, backend="eager")(**lm.example_inputs))
    assert (want - base).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
