"""GET /logs: recent inference records from the box's own store, newest first."""

from __future__ import annotations

from aiohttp import web

from edge_agent.errors import InvalidRequest, NotFound
from edge_agent.logbook import MAX_READ_LIMIT
from edge_agent.protocol.logs import LogPage, LogRecord
from edge_agent.server.state import state_of
from edge_agent.server.wire import json_response


async def recent_logs(request: web.Request) -> web.Response:
    store = state_of(request).log_store
    if store is None:
        raise NotFound("the inference log is switched off on this box (logs.enabled = false)")
    raw_limit = request.query.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_READ_LIMIT:
        raise InvalidRequest(
            f"limit: must be a whole number from 1 to {MAX_READ_LIMIT}", param="limit"
        )
    start_ms, end_ms = _epoch_ms(request, "start"), _epoch_ms(request, "end")
    records, has_more = await store.read(
        limit=int(raw_limit),
        since=request.query.get("since"),
        before=request.query.get("before"),
        start_ms=start_ms,
        end_ms=end_ms,
    )
    page = LogPage(data=[LogRecord.model_validate(r) for r in records], has_more=has_more)
    return json_response(page)


def _epoch_ms(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 15:
        raise InvalidRequest(f"{name}: epoch milliseconds, a whole number", param=name)
    return int(raw)
