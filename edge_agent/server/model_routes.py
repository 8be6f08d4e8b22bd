"""PUT /models/active: the ops side's way to swap the model (``server/model_swap.py``)."""

from __future__ import annotations

from aiohttp import web

from edge_agent.errors import Conflict, Forbidden, NotFound, SwapFailed
from edge_agent.protocol.edge import ActiveModelRequest, ModelSwapResult
from edge_agent.server.body import read_body, require_json
from edge_agent.server.edge_routes import deployed_models
from edge_agent.server.model_swap import ModelSwitcher
from edge_agent.server.openai_requests import parse_body
from edge_agent.server.state import state_of
from edge_agent.server.wire import json_response

SWITCHER_KEY = web.AppKey("edge_agent_model_switcher", ModelSwitcher)


async def put_active(request: web.Request) -> web.Response:
    """Swap to the named model; answers once it serves, or with why it does not."""
    state = state_of(request)
    settings = state.settings
    # With a token set, the bearer middleware has checked it already. Without one, a LAN
    # where anyone may infer must not be one where anyone may change the model.
    if settings.model_swap_access == "token" and not settings.auth_token:
        raise Forbidden(
            "swapping the model over HTTP needs auth_token to be set (or "
            "model_swap_access = 'open'); on the box, use `edge-agent models use`"
        )
    raw = await read_body(request)
    require_json(request)
    body = parse_body(ActiveModelRequest, raw)
    result = await request.app[SWITCHER_KEY].switch(body.model, origin="http")
    if result.outcome == "not_found":
        raise NotFound(result.detail, param="model", code="model_not_found")
    if result.outcome == "busy":
        raise Conflict(result.detail, param="model", code="model_swap_in_progress")
    if result.outcome == "failed":
        raise SwapFailed(result.detail)
    assert result.outcome in ("swapped", "unchanged")
    return json_response(
        ModelSwapResult(
            outcome=result.outcome,
            model=body.model,
            detail=result.detail,
            mode=result.mode,
            canary_sha256=result.canary.sha256 if result.canary else None,
            seconds=result.seconds,
            models=deployed_models(state),
        )
    )
