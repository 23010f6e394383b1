"""runtime/lower.py's check that generated kernels can run: without the triton package, the Triton
backend is refused at load, saying so, where TRITON_INTERPRET=1 took it for the interpreter on and
every call then failed with "No module named 'triton'"."""
from __future__ import annotations

import importlib.util

import pytest

import slimfx
from slimfx.runtime.lower import BackendUnavailable


def test_the_triton_backend_without_triton_installed_is_refused(llama_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailable, match=r"the triton package is not installed here: `pip install triton`, "
                                                 r"or use backend=\"auto\" or \"eager\""):
        slimfx.load(llama_dir, backend="triton")
    assert slimfx.load(llama_dir).backend == "auto"


def test_a_triton_older_than_3_4_is_refused_by_version(llama_dir, monkeypatch, tmp_path):
    """torch 2.5–2.7 ship Triton 3.1–3.3, which pyproject admits and which has no `triton.knobs`:
    compile and load passed, then every call failed with "cannot import name 'knobs'"."""
    import sys
    import types

    (tmp_path / "triton").mkdir()  # a triton package with no knobs module
    old = types.ModuleType("triton")
    old.__path__, old.__spec__ = [str(tmp_path / "triton")], importlib.util.find_spec("triton")
    monkeypatch.setitem(sys.modules, "triton", old)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailable, match=r"needs Triton 3\.4 or newer, and triton .* is installed here"):
        slimfx.load(llama_dir, backend="triton")


def test_a_kernel_listing_of_a_bfloat16_model_needs_no_triton(monkeypatch, tmp_path):
    """--emit-kernels and --stats import nothing to write the kernels; for a bfloat16 model the GEMM
    asked triton whether it interprets, and died with "No module named 'triton'" (the compile and
    save had already run)."""
    import sys

    import torch

    from slimfx.codegen.kernel import interpreted
    from slimfx.codegen.listing import write_kernels
    from slimfx.models import tiny
    from slimfx.runtime.lower import unlowered

    lm = tiny("llama", layers=1)
    cm = slimfx.compile(lm.model.to(torch.bfloat16), "quantize blocks.*.** : Linear int4 group=16",
                        example_inputs=lm.example_inputs)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert interpreted() is False
    with unlowered(cm.program):
        write_kernels(cm.program.graph, tmp_path / "kernels")
    assert (tmp_path / "kernels" / "index.txt").exists() and len(list((tmp_path / "kernels").iterdir())) > 2
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreted() is True
