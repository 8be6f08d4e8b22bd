"""The aiohttp application: routes, middleware, and the model loading behind a listening port."""

from __future__ import annotations

import asyncio
import socket

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from edge_agent.config import Settings
from edge_agent.engine.backend_choice import BackendFactory, backend_for
from edge_agent.engine.scheduler import Scheduler
from edge_agent.engine.types import Backend
from edge_agent.logbook import LogbookCollector, LogStore, Uploader
from edge_agent.manifest import ModelManifest
from edge_agent.observability import set_model_info
from edge_agent.protocol.edge import (
    ACTIVE_MODEL_PATH,
    DASHBOARD_ASSETS,
    DASHBOARD_PAGES,
    LOGS_PATH,
    SPEC_PATH,
)
from edge_agent.server import (
    dashboard_routes,
    edge_routes,
    embeddings_routes,
    logs_routes,
    model_routes,
    native_routes,
    openai_routes,
    tokenize_routes,
)
from edge_agent.server.middleware import bearer_token, errors_as_envelopes
from edge_agent.server.model_swap import ModelSwitcher
from edge_agent.server.params import served_manifest
from edge_agent.server.state import STATE_KEY, AppState, DiscardingSink, RecordSink, ServedModel

log = structlog.get_logger(__name__)

_LOADER_KEY = web.AppKey("edge_agent_loader", asyncio.Task[None])
_UPLOADER_KEY = web.AppKey("edge_agent_uploader", Uploader)
_LOGBOOK_METRICS_KEY = web.AppKey("edge_agent_logbook_metrics", LogbookCollector)


def create_app(
    settings: Settings,
    manifest: ModelManifest,
    backend: Backend,
    *,
    records: RecordSink | None = None,
    backend_factory: BackendFactory = backend_for,
) -> web.Application:
    """The daemon's app; the model loads in the background once the app starts.

    Inference records go to ``records`` when given, else to the durable log store in
    the state directory (unless logging is off in the settings). A model swap builds
    the new model's backend with ``backend_factory``.
    """
    manifest = served_manifest(manifest, settings.openai_enabled)
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        middlewares=[errors_as_envelopes, bearer_token],
    )
    scheduler = Scheduler(
        backend, max_queue=settings.max_queue, request_timeout_s=settings.request_timeout_s
    )
    log_store = None
    if records is None and settings.logs.enabled:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        log_store = LogStore.from_settings(settings.state_dir, settings.logs)
    state = AppState(
        settings=settings,
        active=ServedModel(manifest, backend, scheduler),
        records=records or log_store or DiscardingSink(),
        log_store=log_store,
    )
    app[STATE_KEY] = state
    app[model_routes.SWITCHER_KEY] = ModelSwitcher(state, backend_factory)
    prefix = openai_routes.PREFIX
    app.router.add_post(f"{prefix}/completions", openai_routes.completions)
    app.router.add_post(f"{prefix}/chat/completions", openai_routes.chat_completions)
    app.router.add_post(f"{prefix}/embeddings", embeddings_routes.embeddings)
    app.router.add_get(f"{prefix}/models", openai_routes.list_models)
    app.router.add_post("/infer", native_routes.infer)
    app.router.add_post("/pipelines/{pipeline}", native_routes.pipeline_infer)
    app.router.add_get("/pipelines", edge_routes.pipelines)
    app.router.add_get("/models", edge_routes.models)
    app.router.add_put(ACTIVE_MODEL_PATH, model_routes.put_active)
    app.router.add_get("/healthz", edge_routes.healthz)
    app.router.add_get("/readyz", edge_routes.readyz)
    app.router.add_get("/metrics", edge_routes.metrics)
    app.router.add_get(LOGS_PATH, logs_routes.recent_logs)
    app.router.add_post(LOGS_PATH, logs_routes.query_logs)
    app.router.add_post("/tokenize", tokenize_routes.tokenize)
    app.router.add_post("/detokenize", tokenize_routes.detokenize)
    app.router.add_get(SPEC_PATH, edge_routes.openapi_yaml)
    for path in DASHBOARD_PAGES:
        app.router.add_get(path, dashboard_routes.page)
    for path in DASHBOARD_ASSETS:
        app.router.add_get(path, dashboard_routes.asset)
    app.router.add_get("/stats", dashboard_routes.stats)
    app.router.add_get("/status", dashboard_routes.status)
    if log_store is not None:
        # The store and the uploader know nothing of metrics: they are read from here.
        collector = LogbookCollector(log_store)
        registry = CollectorRegistry()
        registry.register(collector)
        app[_LOGBOOK_METRICS_KEY] = collector
        app[edge_routes.APP_METRICS] = registry
    app.on_startup.append(_start_loading)
    app.on_startup.append(_start_uploader)
    app.on_cleanup.append(_unload)
    return app


async def _start_loading(app: web.Application) -> None:
    app[_LOADER_KEY] = asyncio.create_task(_load(app[STATE_KEY]))


async def _load(state: AppState) -> None:
    try:
        await state.backend.start()
    except Exception as exc:
        state.status, state.status_detail = "Error", f"model failed to load: {exc}"
        log.error("model_load_failed", error=str(exc))
        return
    state.status, state.status_detail = "Running", "ready"
    manifest = state.manifest
    set_model_info(manifest.name, manifest.sha256, manifest.version)
    log.info("model_ready", model=manifest.name, backend=state.backend.info.name)


async def _start_uploader(app: web.Application) -> None:
    state = app[STATE_KEY]
    if state.log_store is None:
        return
    uploader = Uploader(state.log_store, state.settings.upload, socket.gethostname())
    await uploader.start()
    app[_UPLOADER_KEY] = uploader
    state.uploader = uploader
    app[_LOGBOOK_METRICS_KEY].uploader = uploader


async def wait_until_loaded(app: web.Application) -> None:
    await asyncio.shield(app[_LOADER_KEY])


async def _unload(app: web.Application) -> None:
    loader = app[_LOADER_KEY]
    if not loader.done():
        loader.cancel()
    state = app[STATE_KEY]
    served = state.all_served()
    await app[model_routes.SWITCHER_KEY].close()
    for model in served:
        await model.backend.close()
    # Records of requests that ran until now are in the store; stop shipping, then close.
    if _UPLOADER_KEY in app:
        await app[_UPLOADER_KEY].stop()
    if state.log_store is not None:
        await state.log_store.aclose()
