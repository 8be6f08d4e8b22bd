"""Server-sent events over aiohttp: one ``data:`` event per write, flushed as it is written.

The body has no length, so aiohttp frames it by the client's HTTP version: chunked
under HTTP/1.1, and under HTTP/1.0 (which has no chunked encoding) the connection
closes to end it. Forcing chunked encoding would refuse every HTTP/1.0 stream.

A stream that waits for its first token (in the queue, or prefilling a long prompt)
sends a comment line every ``sse_ping_s`` (``keep_alive``): proxies and read timeouts
see bytes moving, and SSE clients, the ``openai`` SDK among them, skip comments.

A client that stops reading fills the socket's send buffer and then the transport's
(both sized by ``http.write_buffer_bytes``; aiohttp waits for a drain every 64 KiB
written), and then a write waits. A write that waits longer than ``http.stream_stall_s`` ends the
stream: the client is holding a slot and memory without taking what it asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"

T = TypeVar("T")


class ClientStalled(Exception):
    """The client took no bytes for the stall timeout; the message says so, for the log."""


class SseWriter:
    def __init__(
        self, request: web.Request, *, stall_s: float = 30.0, buffer_bytes: int = 64 * 1024
    ) -> None:
        """``stall_s`` and ``buffer_bytes``: ``http.stream_stall_s`` and ``write_buffer_bytes``."""
        self._request = request
        self._stall_s = stall_s
        self._buffer_bytes = buffer_bytes
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # keep reverse proxies from batching tokens
            },
        )
        self.started = False

    async def start(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=self._buffer_bytes)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # The kernel's send buffer would otherwise grow to megabytes for a client
                # that reads nothing; events are small, so this costs no throughput.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._buffer_bytes)
        await self._within_stall(self.response.prepare(self._request))
        self.started = True

    async def send(self, event: BaseModel | bytes) -> None:
        body = event if isinstance(event, bytes) else event.model_dump_json().encode()
        await self._within_stall(self.response.write(b"data: " + body + b"\n\n"))

    async def keep_alive(self) -> None:
        await self._within_stall(self.response.write(KEEP_ALIVE))

    async def done(self) -> web.StreamResponse:
        await self._within_stall(self.response.write(DONE))
        await self._within_stall(self.response.write_eof())
        return self.response

    def abort(self) -> None:
        """Drop the connection and what is buffered for it (after a stall)."""
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    async def _within_stall(self, write: Awaitable[object]) -> None:
        try:
            async with asyncio.timeout(self._stall_s):
                await write
        except TimeoutError:
            raise ClientStalled(
                f"client read nothing for {self._stall_s:g} s; the stream was ended"
            ) from None


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
