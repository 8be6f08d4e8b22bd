"""Server-sent events over aiohttp: one ``data:`` event per write, flushed as it is written.

The body has no length, so aiohttp frames it by the client's HTTP version: chunked
under HTTP/1.1, and under HTTP/1.0 (which has no chunked encoding) the connection
closes to end it. Forcing chunked encoding would refuse every HTTP/1.0 stream.

A stream that waits for its first token (in the queue, or prefilling a long prompt)
sends a comment line every ``sse_ping_s`` (``keep_alive``): proxies and read timeouts
see bytes moving, and SSE clients, the ``openai`` SDK among them, skip comments.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"

T = TypeVar("T")


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

    async def keep_alive(self) -> None:
        await self._response.write(KEEP_ALIVE)

    async def done(self) -> web.StreamResponse:
        await self._response.write(DONE)
        await self._response.write_eof()
        return self._response


async def keep_alive(
    items: AsyncGenerator[T, None], writer: SseWriter, interval_s: float
) -> AsyncGenerator[T, None]:
    """``items`` as they come, with a keep-alive comment every ``interval_s`` until the first.

    Closing this closes ``items``: a disconnect while waiting cancels the wait, and so
    the work behind it.
    """
    try:
        first: asyncio.Future[T] = asyncio.ensure_future(anext(items))
        try:
            while not (await asyncio.wait({first}, timeout=interval_s))[0]:
                await writer.keep_alive()
        finally:
            if not first.done():
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await first
        try:
            item = first.result()
        except StopAsyncIteration:
            return
        yield item
        async for item in items:
            yield item
    finally:
        await items.aclose()
