"""Fixtures for tests/passes: the `arch` parameter over every supported architecture."""
from __future__ import annotations

import pytest

from slimfx.models import TINY_ARCHS


@pytest.fixture(scope="session", params=list(TINY_ARCHS))
def arch(request) -> str:
    """Session-scoped, so pytest orders tests arch by arch and each is captured once."""
    return request.param
