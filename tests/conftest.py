"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from engine.testing import Stubs, open_stubs


@pytest.fixture
async def stubs() -> AsyncIterator[Stubs]:
    """The demo upstream services on free ports, for one test."""
    async with open_stubs() as s:
        yield s
