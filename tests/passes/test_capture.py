"""capture(): dynamic shapes, output structure, storage independence, the cache, and errors."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from passes_tiny import DECODERS, captured, example_inputs, state_bytes, tiny_model
from slimfx.dsl.errors import SpecError
from slimfx.models import tiny
from slimfx.passes.capture import capture
from slimfx.passes.capture_cache import cache_info, share_traces


def _leaves(out):
    return [out[k] for k in out.keys()] if hasattr(out, "keys") else list(out)


SHAPES = [(3, 11), (1, 5), (5, 1)]  # (batch, seq), none of them the example's (2, 7)


def test_capture_per_arch(arch):
    """One test per architecture (so xdist workers split the exports): the graph equals eager
    bit for bit (torch.equal, not allclose) at other batch and sequence lengths, and capture
    left the user's model bit-identical and shares no storage with it."""
    c = captured(arch)
    for shape in SHAPES[:1] if arch == "vit" else SHAPES:  # ViT: dynamic batch only
        _check_same_as_eager(c, example_inputs(arch, *shape, seed=1))
    assert state_bytes(c.model) == c.before
    assert not c.model.training
    model_ptrs = {t.data_ptr() for t in c.model.state_dict().values() if t.numel()}
    graph_ptrs = {t.data_ptr() for t in c.graph.module.state_dict().values() if t.numel()}
    assert model_ptrs.isdisjoint(graph_ptrs)
    for check in ARCH_CHECKS.get(arch, ()):
        check(c)


def _check_same_as_eager(c, x):
    with torch.no_grad():  # the graph never returns a KV cache
        want = c.model(**x, **({"use_cache": False} if c.arch in DECODERS else {}))
    got = c.graph(**x)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    for g, w in zip(_leaves(got), _leaves(want)):
        assert g.shape == w.shape
        assert torch.equal(g, w), f"{c.arch} at {tuple(g.shape)}: {(g - w).abs().max()}"


def test_mutating_graph_params_leaves_model_alone():
    c = captured("llama")
    graph = capture(c.model, c.inputs)  # a cache hit: a private copy of the weights
    with torch.no_grad():
        for p in graph.module.parameters():
            p.mul_(0.5).add_(1.0)
    assert state_bytes(c.model) == c.before
    assert not torch.equal(graph.param("lm_head.weight"), c.graph.param("lm_head.weight"))


def _tied_weights_stay_tied_in_the_copy(c):
    g = c.graph
    assert g.param("lm_head.weight") is g.param("transformer.wte.weight")
    assert g.targets["lm_head"].tied == ("lm_head.weight",)


def test_cache_hit_gives_a_fresh_independent_graph():
    c = captured("llama")
    hits = cache_info()["hits"]
    again = capture(c.model, c.inputs)
    assert cache_info()["hits"] == hits + 1
    assert again is not c.graph and again.module is not c.graph.module
    w = "model.layers.0.mlp.up_proj.weight"
    assert again.param(w).data_ptr() != c.graph.param(w).data_ptr()
    assert torch.equal(again.param(w), c.graph.param(w))


class Small(nn.Module):
    """Exports in a fraction of a second: for the cache and mode tests."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.norm, self.drop = nn.LayerNorm(8), nn.Dropout(0.5)

    def forward(self, x):
        return self.norm(x + self.down(self.drop(torch.relu(self.up(x)))))


@pytest.fixture
def own_traces_only():
    """The user's default: no trace shared across models (the suite shares them, conftest.py)."""
    before = share_traces(False)
    yield
    share_traces(before)


def test_weight_edit_invalidates_the_cache(own_traces_only):
    model, x = Small(), torch.randn(2, 8)
    first = capture(model, (x,))
    with torch.no_grad():
        model.up.weight.mul_(2.0)  # bumps _version
    misses = cache_info()["misses"]
    second = capture(model, (x,))
    assert cache_info()["misses"] == misses + 1
    assert torch.equal(second.param("up.weight"), model.up.weight)
    assert not torch.equal(first.param("up.weight"), model.up.weight)
    model.up.weight = nn.Parameter(torch.zeros(16, 8))  # a new tensor: a new identity
    assert torch.equal(capture(model, (x,)).param("up.weight"), torch.zeros(16, 8))
    assert cache_info()["misses"] == misses + 2


def test_cache_does_not_keep_the_model_alive():
    model = Small()
    capture(model, (torch.randn(2, 8),))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_other_input_signature_misses():
    model = Small()
    capture(model, (torch.randn(2, 8),))
    misses = cache_info()["misses"]
    capture(model, (torch.randn(2, 8, dtype=torch.float64),))  # dtype is part of the key
    capture(model, (torch.randn(2, 3, 8),))  # so is the rank / shape
    assert cache_info()["misses"] == misses + 2


def test_size_one_example_is_not_specialized():
    model = tiny_model("opt")
    graph = capture(model, example_inputs("opt", 1, 1))
    x = example_inputs("opt", 3, 6, seed=2)
    with torch.no_grad():
        assert torch.equal(graph(**x).logits, model(**x, use_cache=False).logits)
    assert graph.inputs[0].dims == {0: "batch", 1: "seq"}
    assert all(isinstance(s, str) for s in graph.inputs[0].shape)


def _tuple_inputs_are_bound_by_forward_signature(c):
    hits = cache_info()["hits"]
    graph = capture(c.model, (c.inputs["input_ids"], c.inputs["attention_mask"]))
    assert cache_info()["hits"] == hits + 1  # same names, shapes and dtypes as the dict
    assert [i.name for i in graph.inputs] == ["input_ids", "attention_mask"]
    x = example_inputs("bert", 3, 4, seed=5)
    with torch.no_grad():
        assert torch.equal(graph(x["input_ids"], x["attention_mask"]).last_hidden_state,
                           c.model(**x).last_hidden_state)


# Checks of one architecture's peculiarity, run inside its per-arch test.
ARCH_CHECKS = {"gpt2": (_tied_weights_stay_tied_in_the_copy,),
               "bert": (_tuple_inputs_are_bound_by_forward_signature,)}


def test_plain_module_with_tuple_output():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x), {"double": 2 * x, "n": 3}

    model = TwoOut()
    graph = capture(model, (torch.randn(2, 4),))
    x = torch.randn(5, 4)
    out = graph(x)
    assert isinstance(out, tuple) and out[1]["n"] == 3
    assert torch.equal(out[0], model.lin(x)) and torch.equal(out[1]["double"], 2 * x)
    assert graph.blocks == () and list(graph.targets) == ["lin"]


def test_training_flags_restored_and_graph_is_inference():
    model = Small().train()
    model.norm.eval()
    graph = capture(model, (torch.randn(2, 8),))
    assert model.training and model.drop.training and not model.norm.training
    x = torch.randn(4, 8)
    assert torch.equal(graph(x), graph(x))  # no dropout was traced
    with torch.no_grad():
        assert torch.equal(graph(x), model.eval()(x))


def test_seq_dim_is_known_on_every_hidden_state():
    g = captured("llama").graph
    assert g.dim_symbols("seq") and g.dim_symbols("batch")
    for b in g.blocks:
        assert g.seq_dim(b.input) == 1 and g.seq_dim(b.output) == 1
    assert g.seq_dim(g.blocks[0].input) == 1


def test_uncapturable_model_raises_spec_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # branching on a value: export cannot trace it
                return x + 1
            return x - 1

    with pytest.raises(SpecError) as info:
        capture(DataDependent(), (torch.randn(2, 3),))
    err = info.value
    assert err.kind == "unsupported"
    assert "DataDependent" in err.message and "torch.export" in err.message
    assert err.__cause__ is not None


@pytest.mark.parametrize("edit", ["activation", "scaling", "config", "hook", "class forward"])
def test_a_change_that_touches_no_tensor_misses_the_cache(edit, monkeypatch):
    """A second compile after such a change reused the first capture: the compiled model computed
    the old model (0.10 off after swapping the activation), silently."""
    lm = tiny("llama")
    model, inputs = lm.model, lm.example_inputs
    capture(model, inputs)
    if edit == "activation":
        for layer in model.model.layers:
            layer.mlp.act_fn = nn.ReLU()
    elif edit == "scaling":
        model.model.layers[0].self_attn.scaling = 0.01
    elif edit == "config":
        model.config.output_hidden_states = True
    elif edit == "class forward":  # every LlamaMLP at once; monkeypatch puts it back after
        mlp_class = type(model.model.layers[0].mlp)
        old_forward = mlp_class.forward
        monkeypatch.setattr(mlp_class, "forward", lambda self, x: old_forward(self, x) * 2)
    else:
        model.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: out * 2)
    misses = cache_info()["misses"]
    graph = capture(model, inputs)
    assert cache_info()["misses"] == misses + 1
    with torch.no_grad():
        want, got = model(**inputs, use_cache=False), graph(**inputs)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert ("hidden_states" in got) == (edit == "config")
    hits = cache_info()["hits"]
    capture(model, inputs)  # and the changed model is cached in turn
    assert cache_info()["hits"] == hits + 1


def test_a_new_hook_of_the_same_code_misses_the_cache():
    """Hooks were keyed by id: a removed closure's id went to the next one (same code, another
    scale), and the old capture was reused."""
    lm = tiny("llama")
    model, inputs = lm.model, lm.example_inputs

    def scaled(s):
        return lambda mod, args, out: out * s

    handle = model.model.layers[0].mlp.register_forward_hook(scaled(2.0))
    capture(model, inputs)
    handle.remove()
    model.model.layers[0].mlp.register_forward_hook(scaled(3.0))
    graph = capture(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(graph(**inputs).logits, model(**inputs, use_cache=False).logits)


def test_the_cache_does_not_keep_a_transformers_model_alive():
    lm = tiny("bert")
    capture(lm.model, lm.example_inputs)
    ref = weakref.ref(lm.model)
    del lm
    gc.collect()
    assert ref() is None


def test_a_four_dimensional_attention_mask_varies_in_its_sequence_dims():
    """[batch, 1, seq, seq]: dim 1 was taken for the sequence, doubled beside a broadcast head dim,
    and export's failure was reported as a model it cannot trace."""
    import slimfx
    from slimfx.models import tiny

    model = tiny("llama").model

    def causal(b, s):
        mask = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None].expand(b, 1, s, s).clone()
        return {"input_ids": torch.randint(3, 250, (b, s), generator=torch.Generator().manual_seed(s)),
                "attention_mask": mask}

    cm = slimfx.compile(model, "", example_inputs=causal(2, 6))
    assert cm.graph.inputs[1].dims == {0: "batch", 2: "seq", 3: "seq"}
    with torch.no_grad():
        assert torch.equal(cm(**causal(3, 9)).logits, model(**causal(3, 9)).logits)


def test_a_four_dimensional_mask_with_one_query_row_broadcasts_it():
    """[batch, 1, 1, seq] (BERT's extended form): its query dim of 1 was taken for the sequence,
    widened, and export failed."""
    import slimfx

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(50, 16), nn.Linear(16, 50)

        def forward(self, input_ids, attention_mask):
            h = self.emb(input_ids)
            s = (h @ h.transpose(1, 2) / 4)[:, None] + attention_mask
            return self.out(s.softmax(-1)[:, 0] @ h)

    torch.manual_seed(0)
    model = Enc().eval()
    ids = torch.randint(0, 50, (2, 6))
    cm = slimfx.compile(model, "", example_inputs={"input_ids": ids, "attention_mask": torch.zeros(2, 1, 1, 6)})
    assert cm.graph.inputs[1].dims == {0: "batch", 3: "seq"}
    other, mask = torch.randint(0, 50, (3, 9)), torch.zeros(3, 1, 1, 9)
    assert torch.equal(cm(input_ids=other, attention_mask=mask), model(other, mask))
