"""What the check_policy tests share: tiny models (one instance per module, so slimfx's capture
cache exports each once) and the policy they quantize with."""
from __future__ import annotations

import pytest

from slimfx.models import tiny

FEW = 8  # examples per passing check: each is two forward passes of a tiny model


def quantize(fmt: str) -> str:
    return f"policy p {{\n    quantize blocks.*.** : Linear {fmt}\n}}\n"


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")  # one instance per module: slimfx's capture cache then exports it once


@pytest.fixture(scope="module")
def bert():
    return tiny("bert")
