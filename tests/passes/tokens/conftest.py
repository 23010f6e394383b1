"""Shared by the token pass tests: the tiny BERT most of them compile (test_prune.py overrides it
with one whose block outputs have distinct norms)."""
from __future__ import annotations

import pytest

from slimfx.models import tiny


@pytest.fixture(scope="module")
def bert():
    return tiny("bert", layers=4)
