"""Every failure leaves as the OpenAI error envelope: never an HTML page or a traceback."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from edge_agent.engine.errors import EngineError
from edge_agent.errors import (
    ApiError,
    AuthenticationFailed,
    BodyTooLarge,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)
from edge_agent.protocol.edge import LOG_PATHS, open_paths
from edge_agent.server.engine_errors import as_api_error
from edge_agent.server.state import state_of
from edge_agent.server.wire import json_response

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: ApiError) -> web.Response:
    return json_response(error.envelope(), status=error.status, headers=error.headers)


@web.middleware
async def errors_as_envelopes(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error)
    except EngineError as error:  # a route that left it unmapped: still the right status
        return error_response(as_api_error(error))
    except web.HTTPRequestEntityTooLarge:
        limit = state_of(request).settings.max_request_bytes
        return error_response(BodyTooLarge(f"request body is larger than {limit} bytes"))
    except web.HTTPMethodNotAllowed as exc:
        not_allowed = MethodNotAllowed(
            f"method {request.method} is not allowed on {request.path}",
            headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
        )
        return error_response(not_allowed)
    except web.HTTPNotFound:
        return error_response(NotFound(f"no such path: {request.path}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_http_error(exc))
    except Exception:
        log.exception("unhandled_error", path=request.path)
        return error_response(InternalError("internal error; the daemon logged the details"))


def _http_error(exc: web.HTTPException) -> ApiError:
    error = InvalidRequest(exc.reason or "bad request")
    error.status = exc.status  # type: ignore[misc]
    return error


@web.middleware
async def bearer_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Inference needs ``auth_token`` when one is set; the log's paths follow ``logs_access``,
    the page's data ``dashboard_access``."""
    settings = state_of(request).settings
    if request.path in LOG_PATHS:
        access = settings.effective_logs_access
        if access == "off":
            raise NotFound("the inference log is not served over HTTP on this box (logs_access)")
        needs_token = access == "token"
    else:
        open_here = open_paths(settings.dashboard_access)
        needs_token = bool(settings.auth_token) and request.path not in open_here
    if needs_token and not _bearer_matches(request, settings.auth_token):
        raise AuthenticationFailed("missing or wrong bearer token")
    return await handler(request)


def _bearer_matches(request: web.Request, token: str | None) -> bool:
    if not token:  # logs_access = token without a token: refused at load, refused here too
        return False
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    # Bytes, not str: compare_digest refuses non-ASCII str, and a header is the client's to
    # choose. The comparison takes the same time wherever the first wrong byte is.
    given = value.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, token.encode())
