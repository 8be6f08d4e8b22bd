"""Server-sent events over aiohttp: one ``data:`` event per write, flushed as it is written.

The body has no length, so aiohttp frames it by the client's HTTP version: chunked
under HTTP/1.1, and under HTTP/1.0 (which has no chunked encoding) the connection
closes to end it. Forcing chunked encoding would refuse every HTTP/1.0 stream.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"


class SseWriter:
    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # keep reverse proxies from batching tokens
            },
        )
        self.started = False

    async def start(self) -> None:
        await self._response.prepare(self._request)
        self.started = True

    async def send(self, event: BaseModel | bytes) -> None:
        body = event if isinstance(event, bytes) else event.model_dump_json().encode()
        await self._response.write(b"data: " + body + b"\n\n")

    async def done(self) -> web.StreamResponse:
        await self._response.write(DONE)
        await self._response.write_eof()
        return self._response
