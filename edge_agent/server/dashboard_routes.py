"""The box's own page (``GET /``, ``/dashboard`` and its two assets) and the JSON behind it.

The page is static: HTML, one script and one stylesheet shipped inside the package,
read once and served from memory with an ETag. Everything it shows comes from
``GET /stats`` (series from the inference log's rollups, read in a thread) and
``GET /status`` (live state, no I/O), plus ``GET /logs`` for the latest records.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import time
from dataclasses import dataclass
from functools import cache

from aiohttp import web
from pydantic import ValidationError
from yarl import URL

from edge_agent.errors import InvalidRequest, NotFound
from edge_agent.logbook.rollup import RELATIVE_ERROR
from edge_agent.protocol.dashboard import (
    MAX_POINTS,
    BoxState,
    BoxStatus,
    EngineState,
    LatencyPoint,
    LogState,
    ModelState,
    QueueState,
    RequestPoint,
    StatsQuery,
    StatsSeries,
    UploadState,
)
from edge_agent.protocol.edge import DASHBOARD_ASSETS
from edge_agent.server.state import AppState, state_of
from edge_agent.server.wire import json_response

# The page may load its own script and stylesheet and call its own origin, nothing else:
# the box works air-gapped, and a stray external reference would fail loudly here first.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str


@cache
def _asset(name: str) -> _Asset:
    body = importlib.resources.files("edge_agent.server").joinpath("static", name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
    return _Asset(body, _TYPES[os.path.splitext(name)[1]], etag)


def _serve(request: web.Request, name: str) -> web.Response:
    asset = _asset(name)
    headers = {
        "ETag": asset.etag,
        # Revalidate each time: an upgraded daemon serves its new page at once.
        "Cache-Control": "no-cache",
        "Content-Security-Policy": _CSP,
        "X-Content-Type-Options": "nosniff",
    }
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers
    )


async def page(request: web.Request) -> web.Response:
    """GET / and GET /dashboard: the page."""
    return _serve(request, "dashboard.html")


async def asset(request: web.Request) -> web.Response:
    """GET /dashboard/app.js and /dashboard/app.css."""
    return _serve(request, DASHBOARD_ASSETS[request.path])


async def stats(request: web.Request) -> web.Response:
    """GET /stats?window=1h&step=1m: the charts' series from the inference log."""
    state = state_of(request)
    if state.log_store is None:
        raise NotFound("the inference log is switched off on this box (logs.enabled = false)")
    try:
        query = StatsQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0])
        raise InvalidRequest(f"{param}: {first['msg']}", param=param) from None
    window_s, step_s = query.window_s(), query.step_s()
    if step_s > window_s or window_s // step_s > MAX_POINTS:
        raise InvalidRequest(
            f"step: from 1/{MAX_POINTS} of the window up to the window itself", param="step"
        )
    try:
        series = await state.log_store.series(
            now_ms=int(time.time() * 1000), window_ms=window_s * 1000, step_ms=step_s * 1000
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="step") from None
    body = StatsSeries(
        window=query.window,
        step=query.step_text(),
        start=series.start,
        end=series.end,
        relative_error=round(RELATIVE_ERROR, 4),
        ttft=[LatencyPoint(time=p.time, count=p.count, p50=p.p50, p95=p.p95) for p in series.ttft],
        tps=[LatencyPoint(time=p.time, count=p.count, p50=p.p50, p95=p.p95) for p in series.tps],
        requests=[
            RequestPoint(
                time=p.time,
                total=p.total,
                by_status=p.by_status,
                by_endpoint=p.by_endpoint,
                prompt_tokens=p.prompt_tokens,
                completion_tokens=p.completion_tokens,
            )
            for p in series.requests
        ],
    )
    return json_response(body)


async def status(request: web.Request) -> web.Response:
    """GET /status: readiness, model, engine, queue, log and upload state, right now."""
    return json_response(box_status(state_of(request)))


def box_status(state: AppState) -> BoxStatus:
    settings, manifest, info = state.settings, state.manifest, state.backend.info
    scheduler = state.scheduler
    return BoxStatus(
        time=int(time.time() * 1000),
        pipeline=settings.pipeline,
        ready=state.ready,
        state=_state_name(state),
        reason=state.not_ready_reason,
        uptime_s=round(time.time() - state.started_at, 1),
        model=ModelState(
            name=manifest.name, version=manifest.version, sha=manifest.sha256, status=state.status
        ),
        engine=EngineState(
            backend=info.name,
            configuration=info.configuration,
            configuration_reason=info.configuration_reason,
            detail=info.detail,
            cpu_features=list(info.cpu_features),
            threads=settings.threads or os.cpu_count() or 1,
            slots=info.parallel,
            context_length=info.context_length,
            prefix_cache=settings.prefix_cache,
            restarts=info.restarts,
            pid=info.engine_pid,
        ),
        queue=QueueState(
            in_flight=scheduler.in_flight,
            busy_slots=min(scheduler.in_flight, info.parallel),
            slots=info.parallel,
            queued=scheduler.queued,
            max_queue=settings.max_queue,
        ),
        logs=_log_state(state),
        upload=_upload_state(state),
    )


def _state_name(state: AppState) -> BoxState:
    if state.draining:
        return "draining"
    if state.status == "Loading":
        return "loading"
    if state.status == "Error":
        return "error"
    if state.swap_pause is not None:
        return "swapping"
    return "restarting" if state.backend.unavailable is not None else "ready"


def _log_state(state: AppState) -> LogState:
    if state.log_store is None:
        return LogState(enabled=False)
    s = state.log_store.stats()
    return LogState(
        enabled=True,
        records=s.records,
        disk_bytes=s.disk_bytes,
        max_bytes=s.max_bytes,
        append_failures=s.append_failures,
    )


def _upload_state(state: AppState) -> UploadState:
    url = state.settings.upload.url
    upload = UploadState(enabled=bool(url), url=_without_credentials(url) if url else None)
    if state.log_store is not None:
        s = state.log_store.stats()
        age = None
        if s.oldest_pending_ms is not None:
            age = round(max(0.0, time.time() - s.oldest_pending_ms / 1000), 1)
        upload.backlog_records = s.pending
        upload.backlog_age_s = age
        upload.dropped_records = s.dropped_total
        upload.parked_records = s.parked_records
    if state.uploader is not None:
        u = state.uploader.stats()
        upload.successes, upload.failures = u.successes, u.failures
        upload.uploaded_records, upload.last_error = u.uploaded_records, u.last_error
        if u.last_success_unix is not None:
            upload.last_success = int(u.last_success_unix * 1000)
    return upload


def _without_credentials(url: str) -> str:
    try:
        return str(URL(url).with_user(None))
    except ValueError:
        return "(not a valid URL)"
