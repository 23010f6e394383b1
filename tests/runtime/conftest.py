"""Fixtures for tests/runtime: `arch` over every tiny architecture, and saved artifacts."""
from __future__ import annotations

import pytest

from runtime_tiny import ARCHS, compiled


@pytest.fixture(scope="session", params=list(ARCHS))
def arch(request) -> str:
    """Session-scoped, so pytest orders tests arch by arch and each is captured once."""
    return request.param


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """arch -> the directory its CompiledModel was saved to (once per session)."""
    dirs = {}

    def get(arch: str):
        if arch not in dirs:
            dirs[arch] = tmp_path_factory.mktemp(f"artifact-{arch}") / "model"
            compiled(arch).cm.save(dirs[arch])
        return dirs[arch]

    return get


@pytest.fixture
def llama_dir(saved, tmp_path):
    """A private copy of the saved tiny Llama artifact, free to damage."""
    import shutil
    from pathlib import Path

    return Path(shutil.copytree(saved("llama"), tmp_path / "llama"))
