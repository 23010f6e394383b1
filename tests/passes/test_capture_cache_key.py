"""The capture cache misses after changes its key once missed: a Hugging Face model's attention
implementation (config.to_dict() leaves `_attn_implementation` out) and a dataclass config's
fields (keyed by identity, so an edited config reused the old trace), and a plain config object's."""
from __future__ import annotations

import dataclasses
import types

import torch
from torch import nn

import slimfx
from slimfx.models import tiny
from slimfx.passes.capture import capture
from slimfx.passes.capture_cache import cache_info, clear_cache


def test_set_attn_implementation_misses_the_cache():
    lm = tiny("llama", layers=1)
    clear_cache()
    capture(lm.model, lm.example_inputs)
    lm.model.set_attn_implementation("eager" if lm.model.config._attn_implementation != "eager" else "sdpa")
    capture(lm.model, lm.example_inputs)
    assert cache_info()["hits"] == 0 and cache_info()["misses"] == 2


@dataclasses.dataclass
class Cfg:
    scale: float = 1.0
    act: str = "relu"


class Configured(nn.Module):
    def __init__(self):
        super().__init__()
        self.config, self.l = Cfg(), nn.Linear(4, 4)

    def forward(self, x):
        h = self.l(x) * self.config.scale
        return torch.relu(h) if self.config.act == "relu" else torch.tanh(h)


def test_an_edited_dataclass_config_is_traced_again():
    torch.manual_seed(0)
    m, x = Configured().eval(), torch.randn(2, 4)
    slimfx.compile(m, "", example_inputs=x)
    m.config.scale, m.config.act = 3.0, "tanh"
    cm = slimfx.compile(m, "", example_inputs=x)
    with torch.no_grad():
        assert torch.equal(cm(x), m(x))


class PlainCfg:  # a hand-written config class, neither a dataclass nor a Hugging Face config
    def __init__(self):
        self.scale, self.act = 1.0, "relu"


def test_an_edited_plain_object_config_is_traced_again():
    torch.manual_seed(0)
    for cfg in (PlainCfg(), types.SimpleNamespace(scale=1.0, act="relu")):
        m, x = Configured().eval(), torch.randn(2, 4)
        m.config = cfg
        slimfx.compile(m, "", example_inputs=x)
        m.config.scale, m.config.act = 3.0, "tanh"
        cm = slimfx.compile(m, "", example_inputs=x)
        with torch.no_grad():
            assert torch.equal(cm(x), m(x))


def test_an_unchanged_plain_object_config_hits_the_cache():
    torch.manual_seed(0)
    m, x = Configured().eval(), torch.randn(2, 4)
    m.config = PlainCfg()
    clear_cache()
    capture(m, x)
    capture(m, x)
    assert cache_info()["hits"] == 1
