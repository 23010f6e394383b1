"""ModelGraph: blocks, residual stream, targets and roles per architecture, nx view, lint."""
from __future__ import annotations

from dataclasses import replace

import networkx as nx
import pytest
import torch

from passes_tiny import EXPECTED, captured, one_of
from slimfx.passes.graph import LintError

def test_index_per_arch(arch):
    """One test per architecture (so xdist workers split the exports); each check is a helper."""
    c = captured(arch)
    _blocks_found_and_counted(c)
    _residual_stream_chains_blocks(c)
    _roles_of_block_zero(c)
    _top_level_roles(c)
    _target_records(c)
    _lint_passes(c)
    _nx_view(c)
    for check in ARCH_CHECKS.get(arch, ()):
        check(c)


def _blocks_found_and_counted(c):
    g = c.graph
    assert one_of(EXPECTED[c.arch][0], g.blocks_path)
    assert len(g.blocks) == c.model.config.num_hidden_layers
    assert [b.path for b in g.blocks] == [f"{g.blocks_path}.{i}" for i in range(len(g.blocks))]
    assert all(b.nodes for b in g.blocks)
    assert not set.intersection(*(set(b.nodes) for b in g.blocks))


def _residual_stream_chains_blocks(c):
    g = c.graph
    for prev, nxt in zip(g.blocks, g.blocks[1:]):
        assert nxt.input is prev.output
    for b in g.blocks:
        assert b.input not in b.nodes and b.output in b.nodes
        assert b.input.meta["val"].shape[-1] == b.output.meta["val"].shape[-1] == 64
        assert str(b.input.meta["val"].shape) == str(b.output.meta["val"].shape)


def _roles_of_block_zero(c):
    g = c.graph
    _, q, down, *_ = EXPECTED[c.arch]
    fused = q.startswith("fused:")
    role = "attn.qkv" if fused else "attn.q"
    assert one_of(q.removeprefix("fused:"), g.by_role(role, block=0)[0].path)
    assert one_of(down, g.by_role("mlp.down", block=0)[0].path)
    for b in g.blocks:
        roles = {g.targets[p].role for p in b.targets}
        assert {role, "attn.o", "mlp.down", "norm"} <= roles, roles
        assert ({"attn.q", "attn.k", "attn.v"} <= roles) != fused


def _top_level_roles(c):
    g = c.graph
    _, _, _, embed, head, final = EXPECTED[c.arch]
    assert [t.path for t in g.by_role("embed")] == [embed]
    if head is None:
        assert g.by_role("head") == []
    else:
        assert one_of(head, g.by_role("head")[0].path)
    assert [t.path for t in g.by_role("final_norm")] == ([final] if final else [])


def _target_records(c):
    g = c.graph
    for t in g.targets.values():
        tensors = [g.param(p) for p in t.params]
        assert t.shapes == tuple(tuple(x.shape) for x in tensors)
        assert t.nbytes == sum(x.numel() * x.element_size() for x in tensors)
        assert t.nodes and all(n.graph is g.module.graph for n in t.nodes)
        assert (t.block is None) == (g.block_of(t.path) is None)
        assert t.kind in ("linear", "embedding", "norm", "conv")


def _lint_passes(c):
    c.graph.lint()


def _nx_view(c):
    g = c.graph
    view = g.nx()
    assert view.number_of_nodes() == len(g.module.graph.nodes)
    assert nx.is_directed_acyclic_graph(view)
    b0 = g.blocks[0]
    assert view.nodes[b0.output.name]["block"] == 0
    assert nx.has_path(view, b0.input.name, b0.output.name)


def _conv1d_is_a_transposed_linear(c):
    t = c.graph.targets["transformer.h.0.mlp.c_fc"]
    assert t.kind == "linear" and t.cls == "Conv1D" and t.transposed
    assert t.shapes[0] == (64, 128)


def _qk_norms_have_their_own_roles(c):
    g = c.graph
    assert [t.path for t in g.by_role("attn.q_norm", 0)] == ["model.layers.0.self_attn.q_norm"]
    assert "model.layers.0.self_attn.q_norm" not in [t.path for t in g.by_role("norm", 0)]


# Checks of one architecture's peculiarity, run inside its per-arch test.
ARCH_CHECKS = {"gpt2": (_conv1d_is_a_transposed_linear,),
               "qwen3": (_qk_norms_have_their_own_roles,)}


def test_blocks_stay_the_blocks_when_some_were_rewritten():
    """One block's linear quantized (qweight/scales for weight) and another's adapted (lora_A/B
    beside it): the index still finds every block, and lint agrees with a fresh index."""
    g = _fresh("llama")
    q = g.module.get_submodule("model.layers.0.self_attn.q_proj")
    k = g.module.get_submodule("model.layers.1.self_attn.k_proj")
    for module, path, names in ((q, "model.layers.0.self_attn.q_proj", ("qweight", "scales")),
                                (k, "model.layers.1.self_attn.k_proj", ("lora_A", "lora_B"))):
        info = g.modules[path]
        kept = tuple(p for p in info.params if not (module is q and p.name.endswith(".weight")))
        extra = tuple(replace(info.params[0], name=f"{path}.{n}") for n in names)
        g.modules[path] = replace(info, params=kept + extra)
    g.reindex()
    assert [b.path for b in g.blocks] == ["model.layers.0", "model.layers.1"]
    assert g.by_role("attn.q", 0)[0].block == 0


# ---- lint catches broken invariants ----------------------------------------------------------


def _fresh(arch: str):
    from slimfx.passes.capture import capture

    c = captured(arch)
    return capture(c.model, c.inputs)  # a cache hit: a private copy to break


def test_lint_reports_a_stale_index():
    g = _fresh("llama")
    last = g.blocks[-1]
    # Bypass the last block (its output's users read its input): a collapse without reindex().
    last.output.replace_all_uses_with(last.input)
    g.module.graph.eliminate_dead_code()
    with pytest.raises(LintError, match="stale"):
        g.lint()
    g.reindex()
    assert g.blocks[-1].output is None  # nothing of block 1 reaches the output any more
    with pytest.raises(LintError) as info:
        g.lint()  # the bypassed block's weights are still on the module
    assert "stale" not in str(info.value) and "dangling" in str(info.value)


def test_lint_reports_a_block_that_no_longer_reads_the_one_before():
    g = _fresh("llama")
    assert g.chain_break is None
    first, second = g.blocks[0], g.blocks[1]
    # Block 1 reads what entered block 0: a rewrite that lost block 0's contribution.
    second.input.replace_all_uses_with(first.input, delete_user_cb=lambda u: u in second.nodes)
    g.reindex()
    with pytest.raises(LintError, match=r"block 1 \(model.layers.1\) reads .* as its residual input, not block 0's"):
        g.lint()


def test_lint_reports_missing_meta_val():
    g = _fresh("gpt2")
    node = next(n for n in g.module.graph.nodes if n.op == "call_function")
    del node.meta["val"]
    with pytest.raises(LintError, match="no meta\\['val'\\]") as info:
        g.lint()
    assert node.name in str(info.value)


def test_lint_reports_dangling_param():
    g = _fresh("bert")
    g.module.register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(LintError, match="'stray'.*dangling"):
        g.lint()


@pytest.mark.parametrize("name, attention", [("mpnet", "attention.attn.{q,k,v,o}"),
                                             ("deberta_v2", "attention.self.{query,key,value}_proj")])
def test_attention_roles_of_models_slimfx_does_not_ship(name, attention):
    """MPNet keeps q, k, v, o in `attention.attn`, DeBERTa-v2 names them `query_proj` …: they had
    no role, so `attn.{q,v}` matched nothing and its hint led to paths that did not work either."""
    import transformers

    from slimfx.passes.capture import capture

    torch.manual_seed(0)
    small = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64)
    model = (transformers.MPNetModel(transformers.MPNetConfig(**small)) if name == "mpnet" else
             transformers.DebertaV2Model(transformers.DebertaV2Config(**small, type_vocab_size=0))).eval()
    ids = torch.randint(3, 200, (2, 9))
    g = capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    roles = {g.targets[p].role: p for p in g.blocks[0].targets}
    expected = ({"attn.q": "attention.attn.q", "attn.k": "attention.attn.k", "attn.v": "attention.attn.v",
                 "attn.o": "attention.attn.o"} if name == "mpnet" else
                {"attn.q": "attention.self.query_proj", "attn.k": "attention.self.key_proj",
                 "attn.v": "attention.self.value_proj", "attn.o": "attention.output.dense"})
    for role, path in expected.items():
        assert roles.get(role) == f"encoder.layer.0.{path}", (role, roles)


def test_a_wrapped_model_keeps_its_head_and_final_norm():
    """Under a PeftModel (`base_model.model.lm_head`) the head and final norm had no role, and
    `keep head` said the model had none."""
    import peft

    from slimfx.models import tiny
    from slimfx.passes.capture import capture

    lm = tiny("llama")
    wrapped = peft.get_peft_model(lm.model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    roles = {t.path: t.role for t in capture(wrapped, lm.example_inputs).targets.values()}
    assert roles["base_model.model.lm_head"] == "head"
    assert roles["base_model.model.model.norm"] == "final_norm"


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc1, self.fc2 = torch.nn.LayerNorm(d), torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def test_a_model_that_is_its_block_list_indexes_its_blocks():
    """A top-level nn.Sequential of blocks: its targets had no block (each block's norm was the
    final norm), and `drop blocks[1]` was refused as selecting "1.norm (a norm)"."""
    import slimfx
    from slimfx.passes.capture import capture

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(_Block(8), _Block(8), _Block(8)).eval(), torch.randn(2, 5, 8)
    graph = capture(model, {"input": x})
    assert [(t.path, t.role, t.block) for t in graph.targets.values()][:3] == [
        ("0.norm", "norm", 0), ("0.fc1", "mlp.up", 0), ("0.fc2", "mlp.down", 0)]
    cm = slimfx.compile(model, "drop blocks[1]", example_inputs={"input": x})
    with torch.no_grad():
        assert torch.equal(cm(x), model[2](model[0](x)))

    # a heal's map is a tensor of the blocks' container, here the root ("" + ".heal_map": LintError)
    from slimfx.passes.collapse.fit import fit_map

    calib = torch.randn(4, 5, 8)
    cm = slimfx.compile(model, "drop blocks[1]\nheal method=linear", example_inputs={"input": x},
                        calib=[{"input": calib}])
    with torch.no_grad():
        entering = model[0](calib).reshape(-1, 8)
        t = fit_map([entering], [model[1](model[0](calib)).reshape(-1, 8)]).map
        torch.testing.assert_close(cm(x), model[2](model[0](x) @ t), atol=1e-5, rtol=1e-5)
