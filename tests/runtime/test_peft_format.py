"""`CompiledModel.save_adapters` (runtime/peft_format.py) against the real peft package: what it
writes, PeftModel.from_pretrained loads with PEFT's own keys and reproduces the compiled model's
outputs, on Llama, GPT-2 (Conv1D), BERT and ViT, LoRA and DoRA; the refusals say what to do."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import slimfx
from output_compare import max_diff, outputs
from runtime_tiny import compiled
from slimfx.models import tiny
from slimfx.runtime.peft_format import PeftFormatError, pattern_value, save_adapters

# PEFT's notes on fan_in_fan_out; tiny models on one thread (tests/conftest.py)
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

SELECTORS = {"llama": "blocks.*.attn.{q,v}", "gpt2": "blocks.*.attn.**", "bert": "blocks.*.attn.{q,v}",
             "vit": "blocks.*.attn.{q,v}"}
# a second rule on llama gives other ranks and alphas: rank_pattern / alpha_pattern
EXTRA = {"llama": "adapt blocks[0].mlp.down {m} rank=2 alpha=3"}


def _compiled(arch: str, method: str, seed: int = 0):
    rules = [f"adapt {SELECTORS[arch]} {method} rank=4 alpha=8"]
    if arch in EXTRA:
        rules.append(EXTRA[arch].format(m=method))
    cm = _compile(arch, "\n".join(rules))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking adapters: B ≠ 0, magnitudes off the row norms
        for p in cm.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return cm


def _compile(arch: str, rules: str):
    """Compiled from the session's capture of `arch` (runtime_tiny), copied: no second export."""
    return slimfx.compile(compiled(arch).cm, "policy p {\n" + rules + "\n}")


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("arch", list(SELECTORS))
def test_peft_loads_what_save_adapters_wrote(arch, method, tmp_path):
    lm = compiled(arch).loaded
    cm = _compiled(arch, method)
    ours = outputs(cm, lm.example_inputs)
    assert max_diff(ours, outputs(lm.model, lm.example_inputs)) > 1e-3  # the adapters do something
    cm.save_adapters(tmp_path / "adapter")
    pm = PeftModel.from_pretrained(copy.deepcopy(lm.model), tmp_path / "adapter").eval()
    assert max_diff(outputs(pm, lm.example_inputs), ours) < 1e-5
    written = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(written) == set(get_peft_model_state_dict(pm))  # PEFT's own names, every one loaded
    paths = list(cm.adapters)
    wanted = {f"base_model.model.{p}.{k}" for p in paths for k in ("lora_A.weight", "lora_B.weight")}
    if method == "dora":
        wanted |= {f"base_model.model.{p}.lora_magnitude_vector" for p in paths}
    assert set(written) == wanted
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == paths and config["use_dora"] == (method == "dora")
    assert config["fan_in_fan_out"] == (arch == "gpt2")


def test_other_ranks_and_alphas_go_to_the_patterns(tmp_path):
    cm = _compiled("llama", "lora")
    cm.save_adapters(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {"model.layers.0.mlp.down_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.0.mlp.down_proj": 3}


def test_pattern_value_follows_peft():
    path = "model.layers.0.self_attn.q_proj"
    assert pattern_value({"q_proj": 8}, path, 4) == 8
    assert pattern_value({"self_attn.q_proj": 8}, path, 4) == 8
    assert pattern_value({"^q_proj": 8}, path, 4) == 4  # anchored: the whole name only
    assert pattern_value({path: 8}, path, 4) == 8
    assert pattern_value({"v_proj": 8}, path, 4) == 4


def test_no_adapters_is_refused(tmp_path):
    cm = _compile("llama", "adapt blocks.*.attn.{q,v} lora merge=true")
    with pytest.raises(PeftFormatError, match="no adapters to save.*adapt"):
        cm.save_adapters(tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_lora_and_dora_in_one_model_go_to_two_directories(tmp_path):
    lm = compiled("llama").loaded
    cm = _compile("llama", "adapt blocks.*.attn.q lora rank=4\nadapt blocks.*.attn.v dora rank=2")
    with torch.no_grad():
        for p in cm.adapter_parameters():
            p.add_(0.1)
    with pytest.raises(PeftFormatError, match=r"different methods \(lora on .*q_proj.*dora on .*v_proj.*targets="):
        cm.save_adapters(tmp_path / "both")
    lora = [p for p, a in cm.adapters.items() if a.method == "lora"]
    dora = [p for p, a in cm.adapters.items() if a.method == "dora"]
    save_adapters(cm, tmp_path / "lora", targets=lora)
    save_adapters(cm, tmp_path / "dora", targets=dora)
    pm = PeftModel.from_pretrained(copy.deepcopy(lm.model), tmp_path / "lora", adapter_name="a")
    pm.load_adapter(tmp_path / "dora", adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])  # what the refusal tells the user to do
    assert max_diff(outputs(pm.eval(), lm.example_inputs), outputs(cm, lm.example_inputs)) < 1e-5


def test_directory_rules(tmp_path):
    cm = _compiled("bert", "lora")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(PeftFormatError, match="refusing to replace .*notes"):
        cm.save_adapters(other)
    assert (other / "keep.txt").read_text() == "mine"
    (other / "keep.txt").unlink()
    (other / "adapter_config.json").write_text('{"my": "settings"}')  # not PEFT's: it was replaced
    with pytest.raises(PeftFormatError, match="without the adapter_config.json of a PEFT adapter"):
        cm.save_adapters(other)
    assert (other / "adapter_config.json").read_text() == '{"my": "settings"}'
    with pytest.raises(PeftFormatError, match="no adapter on encoder.nothing"):
        save_adapters(cm, tmp_path / "x", targets=["encoder.nothing"])
    cm.save_adapters(tmp_path / "a")
    cm.save_adapters(tmp_path / "a")  # an adapter directory is replaced
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (tmp_path / "a" / "README.md").write_text("PEFT writes one")  # it was deleted without a word
    with pytest.raises(PeftFormatError, match="besides the adapter's files it holds README.md, which saving"):
        cm.save_adapters(tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "PEFT writes one"


@pytest.mark.parametrize("earlier", ["drop blocks[1]", "collapse blocks[0:2]"])
def test_adapters_of_a_model_with_blocks_removed_are_saved_with_a_warning(tmp_path, earlier):
    """PEFT puts them on the original's full depth: its outputs differed from the compiled model's
    (0.18 after a drop, 0.83 after a collapse, on a tiny Llama) with no word; also when the blocks
    went in an earlier compile."""
    lm = tiny("llama", layers=3)
    cm = slimfx.compile(lm, f"{earlier}\nadapt blocks.*.attn.q lora rank=2")
    with pytest.warns(UserWarning, match=r"1 block removed or merged \(model.layers.1\): PeftModel.from_pretrained"
                                         r".*computes another model") as caught:
        cm.save_adapters(tmp_path / "a")
    assert caught[0].filename == __file__
    again = slimfx.compile(slimfx.compile(lm, earlier), "adapt blocks.*.attn.q lora rank=2")
    with pytest.warns(UserWarning, match="1 block removed or merged"):
        again.save_adapters(tmp_path / "b")


def test_adapters_beside_quantized_weights_are_saved_with_a_warning(tmp_path):
    """PEFT puts them over the original float weights: a QLoRA PeftModel differed from the compiled
    model (0.042 on a tiny Llama) with no word."""
    import warnings

    lm = tiny("llama")
    qlora = slimfx.compile(lm, "quantize blocks.*.** : Linear int4 group=16\nadapt blocks.*.attn.q lora rank=2")
    with pytest.warns(UserWarning, match=r"2 of the 2 adapters sit beside weights the policy quantized .*only up to "
                                         r"that quantization") as caught:
        qlora.save_adapters(tmp_path / "q")
    assert caught[0].filename == __file__
    plain = slimfx.compile(lm, "adapt blocks.*.attn.q lora rank=2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.save_adapters(tmp_path / "p")
