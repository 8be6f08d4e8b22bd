"""The edge endpoints: pipelines, models, health, readiness, metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_agent.observability import IN_FLIGHT, QUEUED
from edge_agent.server.state import state_of


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = state_of(request)
    if state.ready:
        return web.json_response({"status": "ready", "model": state.manifest.name})
    status = state.status.lower()
    if state.status == "Running" and state.backend.unavailable is not None:
        status = "restarting"
    return web.json_response(
        {"status": status, "reason": state.not_ready_reason},
        status=503,
        headers={"Retry-After": "5"},
    )


async def pipelines(request: web.Request) -> web.Response:
    state = state_of(request)
    status = "Error" if state.status == "Error" else "Running"
    return web.json_response({"pipelines": [{"id": state.settings.pipeline, "status": status}]})


async def models(request: web.Request) -> web.Response:
    state = state_of(request)
    manifest = state.manifest
    info = state.backend.info
    return web.json_response(
        {
            "models": [
                {
                    "name": manifest.name,
                    "sha": manifest.sha256,
                    "status": state.status,
                    "version": manifest.version,
                    "backend": info.name,
                    "engine": {
                        "configuration": info.configuration,
                        "reason": info.configuration_reason,
                        "restarts": info.restarts,
                        "pid": info.engine_pid,
                        "available": state.backend.unavailable is None,
                        "unavailable_reason": state.backend.unavailable,
                    },
                }
            ]
        }
    )


async def metrics(request: web.Request) -> web.Response:
    scheduler = state_of(request).scheduler
    IN_FLIGHT.set(scheduler.in_flight)
    QUEUED.set(scheduler.queued)
    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response
