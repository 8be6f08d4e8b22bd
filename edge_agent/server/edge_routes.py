"""The edge endpoints: pipelines, models, health, readiness, metrics, the OpenAPI document."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from edge_agent.observability import IN_FLIGHT, QUEUED
from edge_agent.openapi import YAML_CONTENT_TYPE, spec_yaml
from edge_agent.protocol.edge import (
    DeployedModel,
    DeployedModelList,
    EngineStatus,
    Health,
    ModelRole,
    PipelineList,
    PipelineStatus,
    Readiness,
)
from edge_agent.server.state import AppState, ModelStatus, ServedModel, state_of
from edge_agent.server.wire import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response(Health())


async def readyz(request: web.Request) -> web.Response:
    state = state_of(request)
    if state.ready:
        return json_response(
            Readiness(status="ready", model=state.manifest.name), exclude_none=True
        )
    status = state.status.lower()
    if state.status == "Running" and state.swap_pause is not None:
        status = "swapping"
    elif state.status == "Running" and state.backend.unavailable is not None:
        status = "restarting"
    return json_response(
        Readiness(status=status, reason=state.not_ready_reason),
        status=503,
        headers={"Retry-After": "5"},
        exclude_none=True,
    )


async def pipelines(request: web.Request) -> web.Response:
    state = state_of(request)
    pipeline = PipelineStatus(
        id=state.settings.pipeline,
        status="Error" if state.status == "Error" else "Running",
        # The same version native /infer answers carry as metadata.pipeline_version.
        version=state.manifest.version,
    )
    return json_response(PipelineList(pipelines=[pipeline]))


async def models(request: web.Request) -> web.Response:
    return json_response(DeployedModelList(models=deployed_models(state_of(request))))


def deployed_models(state: AppState) -> list[DeployedModel]:
    """The active model first, then a swap's candidate and the models being retired."""
    listed = [_deployed(state.active, state.status, "active")]
    listed += [_deployed(old, "Running", "retiring") for old in state.retiring]
    if state.candidate is not None:
        manifest = state.candidate.manifest
        listed.append(
            DeployedModel(
                name=manifest.name,
                sha=manifest.sha256,
                status=state.candidate.status,
                version=manifest.version,
                role="candidate",
                reason=state.candidate.reason,
            )
        )
    return listed


def _deployed(served: ServedModel, status: ModelStatus, role: ModelRole) -> DeployedModel:
    manifest, backend = served.manifest, served.backend
    info = backend.info
    return DeployedModel(
        name=manifest.name,
        sha=manifest.sha256,
        status=status,
        version=manifest.version,
        backend=info.name,
        engine=EngineStatus(
            configuration=info.configuration,
            reason=info.configuration_reason,
            restarts=info.restarts,
            pid=info.engine_pid,
            available=backend.unavailable is None,
            unavailable_reason=backend.unavailable,
        ),
        role=role,
    )


# This daemon's own series (the inference log's), beside the process-wide ones.
APP_METRICS = web.AppKey("edge_agent_app_metrics", CollectorRegistry)


async def metrics(request: web.Request) -> web.Response:
    served = state_of(request).all_served()
    IN_FLIGHT.set(sum(m.scheduler.in_flight for m in served))
    QUEUED.set(sum(m.scheduler.queued for m in served))
    body = generate_latest(REGISTRY)
    if APP_METRICS in request.app:
        body += generate_latest(request.app[APP_METRICS])
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def openapi_yaml(request: web.Request) -> web.Response:
    """GET /openapi.yaml: the document, with the server URL the client reached us by."""
    state = state_of(request)
    server_url = f"{request.scheme}://{request.host}"
    text = spec_yaml(state.settings, state.manifest, server_url=server_url)
    return web.Response(text=text, content_type=YAML_CONTENT_TYPE)
