"""A call may repeat the value a keyword flag had in the capture even when the example left it
out: `cm(**x, return_dict=True)` on a graph that returns a ModelOutput was refused with
"compile with example_inputs that include return_dict=True", which gives the same graph."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfx
from slimfx.models import tiny


def test_hf_flags_equal_to_what_the_graph_does_are_accepted(tmp_path):
    lm = tiny("llama", layers=1)
    x = lm.example_inputs
    cm = slimfx.compile(lm.model, "", example_inputs=x)
    cm.save(tmp_path / "a")
    with torch.no_grad():
        want = lm.model(**x).logits
        for model in (cm, slimfx.load(tmp_path / "a")):
            for flag in ({"return_dict": True}, {"output_hidden_states": False}, {"output_attentions": False}):
                out = model(**x, **flag)
                assert torch.equal(out.logits, want) and out.hidden_states is None
            with pytest.raises(TypeError, match="output_hidden_states=True, compile with example_inputs"):
                model(**x, output_hidden_states=True)  # another graph's output


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x, scale: float = 1.0):
        return self.l(x) * scale


def test_a_signature_default_may_be_repeated_and_another_value_is_refused():
    torch.manual_seed(0)
    m, x = Scaled().eval(), torch.randn(2, 4)
    cm = slimfx.compile(m, "", example_inputs={"x": x})
    with torch.no_grad():
        assert torch.equal(cm(x, scale=1.0), m(x))
    with pytest.raises(TypeError, match=r"captured with scale=1.0 \(the model's default\)"):
        cm(x, scale=2.0)


def test_a_forwards_own_flag_default_decides_over_the_config():
    """DPR's encoder declares return_dict=False beside a config that says True: the config's True
    was recorded, so `return_dict=True` was accepted and returned a tuple, and False refused."""
    from transformers import DPRConfig
    from transformers.models.dpr.modeling_dpr import DPREncoder

    torch.manual_seed(0)
    model = DPREncoder(DPRConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    ids = torch.randint(3, 100, (2, 8))
    cm = slimfx.compile(model, "", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert dict(cm.graph.call.defaults)["return_dict"] is False
    assert isinstance(cm(ids, attention_mask=torch.ones_like(ids), return_dict=False), tuple)
    with pytest.raises(TypeError, match="captured with return_dict=False"):
        cm(ids, attention_mask=torch.ones_like(ids), return_dict=True)


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x, k: int = 1, flip: bool = False):
        y = self.l(x) * k
        return -y if flip else y


def test_a_call_leaving_out_a_flag_the_example_set_away_from_its_default_is_refused(tmp_path):
    """`cm(x)` after example (x, 3, True) ran with k=3, flip=True, silently, where the model's own
    `m(x)` uses k=1, flip=False; and `cm(x, 3, True)`, the example's own call, was refused."""
    torch.manual_seed(0)
    m, x = Flagged().eval(), torch.randn(2, 4)
    cm = slimfx.compile(m, "", example_inputs=(x, 3, True))
    cm.save(tmp_path / "a")
    with torch.no_grad():
        want = m(x, 3, True)
        for model in (cm, slimfx.load(tmp_path / "a")):
            with pytest.raises(TypeError, match=r"leaves k out means k=1 \(the forward's default"):
                model(x)
            with pytest.raises(TypeError, match=r"leaves flip out means flip=False \(the forward's default"):
                model(x, 3)
            for call in (lambda: model(x, 3, True), lambda: model(x, k=3, flip=True), lambda: model(x, 3, flip=True)):
                assert torch.equal(call(), want)
        same = slimfx.compile(m, "", example_inputs=(x, 1, False))  # the defaults: nothing to leave out
        assert torch.equal(same(x), m(x))


def test_a_model_captured_with_a_non_default_flag_calibrates_and_trains():
    """Calibration batches (tensors only) counted the flag as left out: every calibrating rule
    failed on such a model."""
    torch.manual_seed(0)
    m, x = Flagged().eval(), torch.randn(2, 4)
    calib = [{"x": torch.randn(8, 4)}] * 2
    cm = slimfx.compile(m, "quantize l int8 method=gptq", example_inputs={"x": x, "k": 3}, calib=calib)
    with torch.no_grad():
        assert torch.allclose(cm(x, k=3), m(x, k=3), atol=0.05)
    adapted = slimfx.compile(m, "adapt l lora rank=2", example_inputs={"x": x, "k": 3})
    with pytest.raises(slimfx.runtime.train.NothingToDistil):  # the student ran with k=3, as the teacher
        slimfx.train(adapted, [{"x": torch.randn(4, 4)}] * 2, steps=2, loss="distill",
                     teacher=lambda **inputs: m(**inputs, k=3))
    assert len(slimfx.train(adapted, [{"x": torch.randn(4, 4)}] * 2, steps=2, loss="distill",
                            teacher=lambda **inputs: m(**inputs, k=2)).losses) == 2


def test_flags_by_position_are_checked_as_by_name():
    """`cm(x, 1)` (forward's own default, by position) was refused as "not captured with", and
    `cm(x, 5, True)` on a graph captured with k=3 named the wrong reason."""
    torch.manual_seed(0)
    m, x = Flagged().eval(), torch.randn(2, 4)
    plain = slimfx.compile(m, "", example_inputs={"x": x})
    with torch.no_grad():
        assert torch.equal(plain(x, 1), m(x)) and torch.equal(plain(x, 1, False), m(x))
    with pytest.raises(TypeError, match="captured with k=1 \\(the model's default\\)"):
        plain(x, 2)
    three = slimfx.compile(m, "", example_inputs=(x, 3, True))
    with pytest.raises(TypeError, match="captured with k=3, which the graph has fixed; k=5 needs another graph"):
        three(x, 5, True)
    with pytest.raises(TypeError, match="flip is given by position and by name"):
        three(x, 3, True, flip=True)


class Summed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, dims=(0, 1), scale=2):
        return self.proj(x).sum(dim=dims) * (scale if isinstance(scale, int) else 1)


def test_a_tuple_flag_is_saved_and_a_call_leaving_it_out_is_refused(tmp_path):
    """dims=(1,) was dropped from meta.json (scalars only), so the loaded model refused dims=(1,)
    itself ("captured without dims"); and a call leaving dims out ran dims=(1,) silently where the
    model's own call sums over (0, 1)."""
    torch.manual_seed(0)
    model, x = Summed().eval(), torch.randn(2, 8, 4)
    cm = slimfx.compile(model, "", example_inputs={"x": x, "dims": (1,)})
    cm.save(tmp_path / "a")
    back = slimfx.load(tmp_path / "a")
    assert back.graph.call == cm.graph.call
    with torch.no_grad():
        want = model(x, dims=(1,))
    for m in (cm, back):
        assert torch.equal(m(x=x, dims=(1,)), want)
        with pytest.raises(TypeError, match=r"captured with dims=\(1,\), and a call that leaves dims out means "
                                            r"dims=\(0, 1\) \(the forward's default"):
            m(x=x)
        with pytest.raises(TypeError, match=r"dims=\[1\] needs another graph"):  # a list is not the tuple
            m(x=x, dims=[1])


def test_a_flag_an_artifact_cannot_store_is_refused_at_save(tmp_path):
    cm = slimfx.compile(Summed().eval(), "", example_inputs={"x": torch.randn(2, 8, 4), "scale": torch.float16})
    with pytest.raises(slimfx.runtime.artifact.ArtifactError,
                       match=r"captured with scale=torch.float16 \(a dtype\), which an artifact cannot store"):
        cm.save(tmp_path / "a")
    assert not (tmp_path / "a").exists()


class Clipped(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, clip=float("inf"), fill=(1,)):
        return self.proj(x).clamp(max=clip) + fill[0]


def test_infinite_and_nested_flags_are_repeated_saved_and_compared_by_type(tmp_path):
    """inf was refused as a default to repeat and at save ("a float, which an artifact cannot
    store"); and `fill=(True,)` was taken for the captured `(1,)`, where a scalar 1 takes no True."""
    x = torch.randn(2, 4)
    cm = slimfx.compile(Clipped().eval(), "", example_inputs={"x": x, "clip": float("inf"), "fill": (2,)})
    cm.save(tmp_path / "a")
    for m in (cm, slimfx.load(tmp_path / "a")):
        m(x=x, clip=float("inf"), fill=(2,))
        for other in ((True,), (2.0,), [2]):
            with pytest.raises(TypeError, match="needs another graph"):
                m(x=x, clip=float("inf"), fill=other)


@pytest.mark.parametrize("flag, value", [("return_dict", False), ("output_hidden_states", True)])
def test_a_call_leaving_out_a_config_flag_the_example_set_is_refused(flag, value, tmp_path):
    """None means the config's value: `return_dict=False` in the example, and a call without it
    got a tuple where the model returns a ModelOutput (hidden states it would not return), silently."""
    lm = tiny("llama", layers=1)
    x = lm.example_inputs
    cm = slimfx.compile(lm.model, "", example_inputs={**x, flag: value})
    cm.save(tmp_path / "a")
    for model in (cm, slimfx.load(tmp_path / "a")):
        with torch.no_grad():
            assert type(model(**x, **{flag: value})) is type(lm.model(**x, **{flag: value}))
        with pytest.raises(TypeError, match=rf"captured with {flag}={value}, and a call that leaves {flag} out means "
                                            rf"{flag}={not value} \(the forward's default, or its model config's\)"):
            model(**x)


def test_the_values_a_graph_computes_anyway_may_be_passed():
    """use_cache=False on a forward that takes it through **kwargs (DistilBERT) was refused with
    "… pass use_cache=False"; Mixtral's output_router_logits=False (its config's) was refused too."""
    import transformers as T

    torch.manual_seed(0)
    x = {"input_ids": torch.randint(0, 128, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    bert = T.DistilBertModel(T.DistilBertConfig(vocab_size=128, dim=32, hidden_dim=64, n_layers=2, n_heads=4)).eval()
    moe = T.MixtralForCausalLM(T.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               num_local_experts=4, num_experts_per_tok=2)).eval()
    with torch.no_grad():
        cm = slimfx.compile(bert, "", example_inputs=x)
        assert torch.equal(cm(**x, use_cache=False).last_hidden_state, bert(**x).last_hidden_state)
        cm = slimfx.compile(moe, "", example_inputs=x)
        assert torch.equal(cm(**x, output_router_logits=False).logits, moe(**x).logits)
        with pytest.raises(TypeError, match="output_router_logits=True"):
            cm(**x, output_router_logits=True)
