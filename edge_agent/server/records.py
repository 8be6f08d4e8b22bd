"""One request's ledger: its outcome, its inference log record and its metrics, said once.

Every inference route opens a ledger and runs inside ``ledger.guard()``: an error, a
refusal or a disconnect is recorded as such, the record is committed exactly once
(before the response's last byte where the route says so), and the metrics and the
request's log line follow when the handler ends, whatever way it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from edge_agent.engine.errors import EngineError
from edge_agent.engine.scheduler import GenerationClock
from edge_agent.errors import ApiError
from edge_agent.logbook import new_record_id
from edge_agent.observability import observe_request
from edge_agent.protocol.logs import LogRecord, RecordEndpoint, RecordStatus
from edge_agent.server.engine_errors import as_api_error
from edge_agent.server.redaction import redact_request, redact_response
from edge_agent.server.state import AppState, ServedModel
from edge_agent.server.strict_json import StrictJsonError, loads_strict

log = structlog.get_logger(__name__)


def request_body_for_log(raw: bytes) -> Any:
    """The body as received: parsed where it is strict JSON, the text where it is not."""
    try:
        return loads_strict(raw)
    except StrictJsonError:  # NaN, repeated keys, nesting past any parser's limit...
        return raw.decode("utf-8", errors="replace")


class RequestLedger:
    """What one request did, filled in as it goes; one per request."""

    def __init__(self, state: AppState, endpoint: RecordEndpoint, raw: bytes) -> None:
        self.state = state
        # The model this request runs on, to its end, whatever a swap does meanwhile.
        self.served: ServedModel = state.active
        self.endpoint = endpoint
        self.raw = raw
        self.clock = GenerationClock()
        self.accepted_ms = int(time.time() * 1000)
        self.request_id = uuid.uuid4().hex
        self.status: RecordStatus = "ok"
        self.error: str | None = None
        self.response_json: str | None = None
        # What the response would be so far, for a record of a request that ends early.
        self.partial_response: Callable[[], str] | None = None
        self.params: dict[str, Any] = {}
        self.prompt_tokens = 0
        self._committed = False

    async def commit(self) -> None:
        """Make the record durable; the first call counts, later ones do nothing."""
        if self._committed:
            return
        self._committed = True
        await self.state.records.append(self.record())

    async def fail(self, error: ApiError | EngineError) -> ApiError:
        """Record a failure and commit; the error as the client sees it."""
        mapped = as_api_error(error) if isinstance(error, EngineError) else error
        self._end_early("error", mapped.message)
        await self.commit()
        return mapped

    async def end_cancelled(self, reason: str) -> None:
        """Record a request ended early for ``reason`` (a stalled client) and commit."""
        self._end_early("cancelled", reason)
        await self.commit()

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[RequestLedger]:
        """Run a handler: every way out leaves one record, then the metrics and a log line."""
        try:
            with self.served.hold():
                yield self
        except (ApiError, EngineError) as error:
            raise await self.fail(error) from None
        except (asyncio.CancelledError, ConnectionResetError):
            self._end_early("cancelled", "client disconnected")
            await asyncio.shield(self.commit())
            raise
        else:
            await self.commit()
        finally:
            self._observe()

    def record(self) -> dict[str, Any]:
        """The record of CONTRACT.md section 6, as stored and uploaded."""
        state, clock = self.state, self.clock
        manifest = self.served.manifest
        request_body, response_json = request_body_for_log(self.raw), self.response_json
        if not state.settings.logs.store_text:
            request_body = redact_request(request_body)
            response_json = redact_response(response_json)
        record = {
            "id": new_record_id(),
            "time": self.accepted_ms,
            "pipeline": state.settings.pipeline,
            "model": {"name": manifest.name, "version": manifest.version, "sha": manifest.sha256},
            "backend": self.served.backend.info.name,
            "endpoint": self.endpoint,
            "in": request_body,
            "out": {"json": response_json},
            "params": self.params,
            "metrics": {
                "ttft": clock.ttft,
                "tps": clock.tps,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": clock.completion_tokens,
                "elapsed_s": clock.elapsed_s,
            },
            "status": self.status,
            "error": self.error,
        }
        return LogRecord.model_validate(record).as_dict()

    def _end_early(self, status: RecordStatus, error: str) -> None:
        self.status, self.error = status, error
        if self.response_json is None and self.partial_response is not None:
            self.response_json = self.partial_response()

    def _observe(self) -> None:
        clock = self.clock
        observe_request(
            endpoint=self.endpoint,
            model=self.served.manifest.name,
            status=self.status,
            ttft=clock.ttft,
            tps=clock.tps,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=clock.completion_tokens,
        )
        log.info(
            "request",
            request_id=self.request_id,
            endpoint=self.endpoint,
            status=self.status,
            error=self.error,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=clock.completion_tokens,
            ttft=clock.ttft,
            tps=clock.tps,
        )
