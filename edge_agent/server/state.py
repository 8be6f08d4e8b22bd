"""What the routes share: settings, the model, the backend and scheduler, and the record sink."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from aiohttp import web

from edge_agent.config import Settings
from edge_agent.engine.scheduler import Scheduler
from edge_agent.engine.types import Backend
from edge_agent.errors import Draining, EngineRestarting, ModelNotReady
from edge_agent.logbook import LogStore, Uploader
from edge_agent.manifest import ModelManifest

ModelStatus = Literal["Loading", "Running", "Error"]


class RecordSink(Protocol):
    """Where inference records go; ``append`` returns once the record is durable."""

    async def append(self, record: dict[str, Any]) -> None: ...


class DiscardingSink:
    """For a daemon run with the inference log switched off."""

    async def append(self, record: dict[str, Any]) -> None:
        return None


@dataclass
class AppState:
    settings: Settings
    manifest: ModelManifest
    backend: Backend
    scheduler: Scheduler
    records: RecordSink = field(default_factory=DiscardingSink)
    log_store: LogStore | None = None  # the durable inference log, when logging is on
    uploader: Uploader | None = None  # ships log_store's records, once the app has started
    status: ModelStatus = "Loading"
    status_detail: str = "model is loading"
    started_at: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return (
            self.status == "Running"
            and not self.scheduler.draining
            and self.backend.unavailable is None
        )

    @property
    def not_ready_reason(self) -> str:
        if self.scheduler.draining:
            return "shutting down"
        if self.status != "Running":
            return self.status_detail
        return self.backend.unavailable or "ready"

    def require_ready(self) -> None:
        """Refuse inference with the right 503 while loading, failed, restarting or stopping."""
        if self.scheduler.draining:
            raise Draining()
        if self.status != "Running":
            raise ModelNotReady(self.status_detail)
        reason = self.backend.unavailable
        if reason is not None:
            raise EngineRestarting(reason)


STATE_KEY = web.AppKey("edge_agent_state", AppState)


def state_of(request: web.Request) -> AppState:
    return request.app[STATE_KEY]
