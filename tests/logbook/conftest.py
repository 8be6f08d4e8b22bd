"""Fixtures for the logbook tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from edge_agent.logbook import LogStore


@pytest.fixture
def registry() -> CollectorRegistry:
    """A private registry per test, so metric values are this test's own."""
    return CollectorRegistry()


@pytest.fixture
async def store(tmp_path: Path, registry: CollectorRegistry) -> AsyncIterator[LogStore]:
    log_store = LogStore(tmp_path / "state" / "logbook.db", registry=registry)
    yield log_store
    await log_store.aclose()
