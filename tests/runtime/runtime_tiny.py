"""Tiny models of every architecture, captured and wrapped in a CompiledModel (empty policy)
once per test session (per xdist worker); shared by the CompiledModel and artifact tests.

A plain module with a unique name (not conftest) so that test files can import it."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from slimfx import models
from slimfx.passes.capture import capture
from slimfx.runtime.compiled import CompiledModel
from slimfx.runtime.report import Report, RuleReport

# Every tiny arch but mistral and qwen2: their graphs use exactly llama's ops (tests/passes
# checks their capture), and each arch costs ~7 s of capture + save + load on 2 cores.
ARCHS = tuple(a for a in models.TINY_ARCHS if a not in ("mistral", "qwen2"))
REPORT = dict(policy="tiny", rules=(RuleReport(1, "keep embed", "keep", targets=("embed",)),))


@dataclass(frozen=True, eq=False)
class Case:
    arch: str
    loaded: models.LoadedModel
    cm: CompiledModel


@functools.lru_cache(maxsize=None)
def compiled(arch: str) -> Case:
    lm = models.tiny(arch)
    graph = capture(lm.model, lm.example_inputs)
    report = Report(model_class=graph.model_class, **REPORT)
    cm = CompiledModel(graph, report=report, policy_text="policy tiny { keep embed }\n",
                       policy_name="tiny")
    return Case(arch, lm, cm)


def eager(lm: models.LoadedModel, inputs: dict[str, torch.Tensor]) -> Any:
    """The original model's output as the graph computes it (no KV cache)."""
    takes_cache = "use_cache" in inspect.signature(lm.model.forward).parameters
    extra = {"use_cache": False} if takes_cache else {}
    with torch.no_grad():
        return lm.model(**inputs, **extra)


def other_inputs(lm: models.LoadedModel, batch: int = 3, seq: int = 13, seed: int = 1):
    """Inputs at another batch (and, for token models, sequence) length than the example's,
    with real padding in the mask."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, x in lm.example_inputs.items():
        if x.is_floating_point():  # pixel values: the batch is the only dynamic dim
            out[name] = torch.randn((batch, *x.shape[1:]), generator=gen, dtype=x.dtype)
        elif "mask" in name:
            mask = torch.ones(batch, seq, dtype=x.dtype)
            mask[-1, seq // 2:] = 0
            out[name] = mask
        elif name == "token_type_ids":
            out[name] = torch.zeros(batch, seq, dtype=x.dtype)
        else:
            vocab = lm.model.config.vocab_size
            out[name] = torch.randint(3, vocab, (batch, seq), generator=gen, dtype=x.dtype)
    return out


def leaves(out: Any) -> list[torch.Tensor]:
    return list(out.values()) if hasattr(out, "keys") else list(out)


def assert_identical(got: Any, want: Any, what: str = "") -> None:
    """Same output type, same fields, and every tensor equal bit for bit."""
    assert type(got) is type(want), f"{what}: {type(got).__name__} != {type(want).__name__}"
    if hasattr(want, "keys"):
        assert list(got.keys()) == list(want.keys()), what
    for g, w in zip(leaves(got), leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        assert torch.equal(g, w), f"{what} at {tuple(g.shape)}: max diff {(g - w).abs().max()}"


def rehash(path) -> None:
    """Make an artifact's meta.json agree with its files again, as someone tampering on purpose would."""
    import hashlib
    import json

    meta = json.loads((path / "meta.json").read_text())
    for name in meta["files"]:
        data = (path / name).read_bytes()
        meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "meta.json").write_text(json.dumps(meta))


def refused(path, *words: str) -> str:
    """load(path) raises an ArtifactError whose message holds every one of `words`; the message."""
    import pytest

    from slimfx.runtime.artifact import ArtifactError, load

    with pytest.raises(ArtifactError) as e:
        load(path)
    for w in words:
        assert w in str(e.value), str(e.value)
    return str(e.value)
