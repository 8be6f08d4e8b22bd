"""Fixtures for the logbook tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent.logbook import LogStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LogStore]:
    log_store = LogStore(tmp_path / "state" / "logbook.db")
    yield log_store
    await log_store.aclose()
