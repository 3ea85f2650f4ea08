"""Fixtures for integration tests: the loopback fake provider, one per session.

Tests share it; each test uses its own model name so knobs and recorded requests never collide.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_provider import FakeProvider


@pytest.fixture(scope="session")
def fake_provider() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider
