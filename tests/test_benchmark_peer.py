"""benchmarks/precision.py's peer (llm-compressor) row without llm-compressor: with no peer venv it
says the row is skipped and how to make the venv, and exits 0; the weights the peer hands back go
into a copy of the model's linears. (And every row name of the script can be asked for.)"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "precision.py"


def _script():
    spec = importlib.util.spec_from_file_location("precision_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_the_peer_venv_the_row_is_skipped_with_the_command(tmp_path, capsys, monkeypatch):
    script = _script()
    monkeypatch.setattr(script, "PEER_VENV", script.ROOT / "no-such-venv-peer")
    monkeypatch.setattr(script, "load", lambda name: pytest.fail("the skip path loads no model"))
    assert script.main(["--rows", "", "--no-minilm", "--peer"]) == 0
    out = capsys.readouterr().out
    assert "peer (llm-compressor) rows skipped" in out and "`bash benchmarks/peer_venv.sh`" in out


def test_every_peer_scheme_names_the_peer_arguments_of_its_rule():
    script = _script()
    for scheme, (rule, args) in script.PEER_SCHEMES.items():
        group = args[args.index("--group") + 1]
        assert f"group={group}" in rule and "method=gptq" in rule and "act_order=true" in rule
        assert ("sym=false" in rule) == ("--asym" in args)
        if scheme in script.ROWS:
            assert script.ROWS[scheme] == rule


def test_every_row_name_can_be_asked_for_with_rows():
    """`--rows` splits on commas: a name holding one could never be run (a trained row's could not)."""
    script = _script()
    for name in [*script.ROWS, *script.TRAINED, *script.ALL_WINDOWS]:
        assert "," not in name, name
    for name, (compiled, steps) in script.TRAINED.items():
        assert compiled in script.ROWS and steps >= 1
    assert all(compiled in script.ROWS for compiled in script.ALL_WINDOWS.values())


def test_a_scheme_compiled_for_the_peer_table_is_timed_without_its_scoring(monkeypatch):
    """"slimfx s" read the clock after the dict that held it had scored perplexity (and the model's
    capture was timed too, where the slimfx rows capture first): 271 s in the README's peer table."""
    import time
    from types import SimpleNamespace

    script = _script()
    calls = []
    monkeypatch.setattr(script, "peer_python", lambda: "python")
    monkeypatch.setattr(script, "load", lambda name: SimpleNamespace(model=None, tokenizer=None))
    monkeypatch.setattr(script, "calibration", lambda loaded, skip: [])
    monkeypatch.setattr(script.slimfx, "plan", lambda loaded, policy: calls.append("captured first"))
    monkeypatch.setattr(script.slimfx, "compile", lambda *a, **k: calls.append("compiled") or object())
    monkeypatch.setattr(script, "perplexity", lambda *a, **k: time.sleep(0.5) or 30.0)
    monkeypatch.setattr(script, "run_peer", lambda *a: ({}, {"seconds": 9.0, "linears": 1, "versions": {}}))
    monkeypatch.setattr(script, "with_weights", lambda model, weights: model)
    (row,) = script.peer_rows(["int4 g32 GPTQ asym"], 64, [])
    assert calls == ["captured first", "compiled"]
    assert row["compile_s"] < 0.25 and row["ppl"] == 30.0


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.down_proj = nn.Linear(8, 4, bias=False), nn.Linear(4, 8)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([_Block(), _Block()])


def test_returned_weights_go_into_a_copy_of_the_models_linears():
    script = _script()
    torch.manual_seed(0)
    model = _Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fake = {"layers.0.q_proj.weight": torch.full((4, 8), 0.25),
            "layers.1.down_proj.weight": torch.arange(32.).view(8, 4)}
    peer = script.with_weights(model, fake)
    for name, w in fake.items():
        assert torch.equal(peer.get_parameter(name), w)
    untouched = set(before) - set(fake)
    assert all(torch.equal(peer.state_dict()[k], before[k]) for k in untouched)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)  # the original is kept
    with pytest.raises(ValueError, match="layers.0.q_proj.weight"):
        script.with_weights(model, {"layers.0.q_proj.weight": torch.zeros(8, 4)})
