"""GET and POST /logs: recent inference records from the box's own store.

Who may call them is the ``logs_access`` setting's business (the middleware's), not
this module's.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from edge_agent.errors import InvalidRequest, NotFound
from edge_agent.logbook import MAX_READ_LIMIT, LogStore
from edge_agent.protocol.logs import LogPage, LogQuery, LogRecord, LogRecords
from edge_agent.server.body import read_body, require_json
from edge_agent.server.state import state_of
from edge_agent.server.strict_json import StrictJsonError, loads_strict
from edge_agent.server.wire import json_response


def _store(request: web.Request) -> LogStore:
    store = state_of(request).log_store
    if store is None:
        raise NotFound("the inference log is switched off on this box (logs.enabled = false)")
    return store


async def recent_logs(request: web.Request) -> web.Response:
    store = _store(request)
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


async def query_logs(request: web.Request) -> web.Response:
    """The product doc's pandas-records form: a filter object in, records out, oldest first."""
    store = _store(request)
    require_json(request)
    query = _query(await read_body(request))
    records, _ = await store.read(limit=query.limit, since=query.since)
    # The store reads newest first; a DataFrame built from the answer ends with the latest.
    answer = LogRecords([LogRecord.model_validate(r) for r in reversed(records)])
    return json_response(answer)


def _query(raw: bytes) -> LogQuery:
    try:
        loads_strict(raw)
        return LogQuery.model_validate_json(raw)
    except StrictJsonError as exc:
        raise InvalidRequest(str(exc)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "model_type":
            raise InvalidRequest(
                "request body must be a JSON object of filters ({} for the latest records)"
            ) from None
        param = ".".join(str(part) for part in first["loc"]) or None
        message = "unknown filter" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidRequest(f"{param}: {message}", param=param) from None
