"""Reading a request body: JSON only, within a deadline, every failure an envelope.

A body that never finishes arriving (a slow or stalled client, a ``Content-Length``
larger than what is sent) must not hold a handler for ever, and a body that arrives
badly framed (broken chunked encoding) is the client's error, not a 500.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from edge_agent.errors import BodyTimeout, BodyTooLarge, InvalidRequest
from edge_agent.server.state import state_of


async def read_body(request: web.Request) -> bytes:
    """The whole body; 408 when it does not arrive within ``http.body_timeout_s``, 413, 400."""
    settings = state_of(request).settings
    timeout = settings.http.body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(
            f"request body is larger than {settings.max_request_bytes} bytes"
        ) from None
    except TimeoutError:
        raise BodyTimeout(f"request body did not arrive within {timeout:g} s") from None
    except RequestPayloadError as exc:
        raise InvalidRequest(f"request body is badly framed: {exc}") from None


def require_json(request: web.Request) -> None:
    """400 unless the body is labelled JSON or not labelled at all (as vLLM's server does)."""
    if "Content-Type" not in request.headers:
        return
    kind = request.content_type
    if kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return
    # Parameters are free: the product doc sends "application/json; format=pandas-records".
    raise InvalidRequest(f"Content-Type must be application/json, not {kind!r}")
