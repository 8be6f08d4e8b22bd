"""What the routes share: settings, the model being served, and the record sink.

The model is swapped in place (``server/model_swap.py``), so a request takes the model
once, when it starts (``AppState.serving``), and keeps it to its last byte: its tokens,
its record and its metrics all name the model that served it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from aiohttp import web

from edge_agent.config import Settings
from edge_agent.engine.scheduler import Scheduler
from edge_agent.engine.types import Backend
from edge_agent.errors import Draining, EngineRestarting, ModelNotReady, ModelSwapping
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


@dataclass(eq=False)
class ServedModel:
    """One loaded model: its manifest, its backend and the scheduler in front of it.

    ``users`` counts the requests holding it; a model swapped out is closed only once
    none does, so a request that began on it ends on it.
    """

    manifest: ModelManifest
    backend: Backend
    scheduler: Scheduler
    users: int = 0
    _unused: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._unused.set()

    @contextlib.contextmanager
    def hold(self) -> Iterator[ServedModel]:
        self.users += 1
        self._unused.clear()
        try:
            yield self
        finally:
            self.users -= 1
            if self.users == 0:
                self._unused.set()

    async def wait_unused(self) -> None:
        await self._unused.wait()


@dataclass
class Candidate:
    """The model a swap is loading, or the last one that failed (with why), for /models."""

    manifest: ModelManifest
    status: ModelStatus
    reason: str
    origin: str  # what asked for it: http, cli, sighup


@dataclass
class AppState:
    settings: Settings
    active: ServedModel
    records: RecordSink = field(default_factory=DiscardingSink)
    log_store: LogStore | None = None  # the durable inference log, when logging is on
    uploader: Uploader | None = None  # ships log_store's records, once the app has started
    status: ModelStatus = "Loading"
    status_detail: str = "model is loading"
    started_at: float = field(default_factory=time.time)
    candidate: Candidate | None = None
    # Models swapped out and still finishing requests that began on them.
    retiring: list[ServedModel] = field(default_factory=list)
    previous_model: str | None = None  # the one served before the last swap
    # Set through a drained swap (no memory for two models): new requests wait it out.
    swap_pause: str | None = None
    draining: bool = False  # the daemon is stopping

    @property
    def manifest(self) -> ModelManifest:
        return self.active.manifest

    @property
    def backend(self) -> Backend:
        return self.active.backend

    @property
    def scheduler(self) -> Scheduler:
        return self.active.scheduler

    def all_served(self) -> list[ServedModel]:
        return [self.active, *self.retiring]

    @contextlib.contextmanager
    def serving(self) -> Iterator[ServedModel]:
        """The model for one request, held until the request ends."""
        with self.active.hold() as served:
            yield served

    @property
    def ready(self) -> bool:
        return (
            self.status == "Running"
            and not self.draining
            and self.swap_pause is None
            and self.backend.unavailable is None
        )

    @property
    def not_ready_reason(self) -> str:
        if self.draining:
            return "shutting down"
        if self.status != "Running":
            return self.status_detail
        if self.swap_pause is not None:
            return self.swap_pause
        return self.backend.unavailable or "ready"

    def require_ready(self, served: ServedModel | None = None) -> None:
        """Refuse inference with the right 503 while loading, failed, restarting or stopping."""
        if self.draining:
            raise Draining()
        if self.status != "Running":
            raise ModelNotReady(self.status_detail)
        if self.swap_pause is not None:
            raise ModelSwapping(self.swap_pause)
        reason = (served or self.active).backend.unavailable
        if reason is not None:
            raise EngineRestarting(reason)

    async def drain(self, grace_s: float) -> bool:
        """Refuse new work and wait for every model's work in flight; True if it finished."""
        self.draining = True
        results = await asyncio.gather(*(m.scheduler.drain(grace_s) for m in self.all_served()))
        return all(results)


STATE_KEY = web.AppKey("edge_agent_state", AppState)


def state_of(request: web.Request) -> AppState:
    return request.app[STATE_KEY]
