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
