"""The listening port, held against a hostile LAN: request-head deadline and a connection cap.

aiohttp closes a connection that has not sent a complete request head within its
keep-alive timeout (the timer starts when the connection opens and partial bytes do
not reset it), so that timeout is the header timeout. It has no cap on connections:
thousands of half-open sockets would each hold a file descriptor until the descriptors
run out and the port stops accepting. The cap here sits where connections are made:
past it, the oldest connection with no request in progress is closed to make room,
and when every connection is busy the newcomer is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from edge_agent.config import Settings
from edge_agent.errors import TooManyConnections
from edge_agent.observability import CONNECTIONS_EVICTED, CONNECTIONS_REFUSED
from edge_agent.server.middleware import Handler

log = structlog.get_logger(__name__)

# Descriptors the daemon needs beside its connections: the log store's database, WAL
# and journal, the engine's pipes, the uploader's connection, the loop's own.
RESERVED_FDS = 128


def _refusal() -> bytes:
    """The whole 503 answer as bytes: written before the request is read, then closed."""
    error = TooManyConnections()
    body = error.envelope().model_dump_json().encode()
    head = f"HTTP/1.1 {error.status} Service Unavailable\r\n"
    for name, value in {
        **error.headers,
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }.items():
        head += f"{name}: {value}\r\n"
    return head.encode() + b"\r\n" + body


class _Refuse(asyncio.Protocol):
    """A connection past the cap with nothing idle to close: one 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_REFUSAL)
        transport.close()


_REFUSAL = _refusal()


def connection_limit(configured: int) -> int:
    """``configured``, or less where the descriptor limit cannot be raised to fit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = configured + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < needed:
        # The soft limit is often 1024 outside systemd; the hard one is ours to go up to.
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return configured
    room = max(1, soft - RESERVED_FDS)
    log.warning("max_connections_lowered", configured=configured, limit=room, nofile=soft)
    return room


class _Tracked(asyncio.Protocol):
    """One connection's request handler, seen by the cap from accept() to close.

    The server's own list learns of a connection only when asyncio calls its
    ``connection_made``, a loop turn after the accept: a burst of connects would get
    past a cap that counted that list.
    """

    def __init__(self, handler: RequestHandler, cap: ConnectionCap) -> None:
        self.handler, self._cap = handler, cap
        self._evicted = False
        self._made = False
        self._handed_over = False  # the handler has its transport: it hears of the close

    def evict(self) -> None:
        """Close it: now if it is connected, else as soon as asyncio hands it its socket."""
        self._evicted = True
        if self._made:
            self.handler.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        if self._evicted:  # pushed out by a burst before its turn came
            transport.close()
            return
        self._handed_over = True
        self.handler.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cap.closed(self)
        if self._handed_over:
            self.handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()  # None: the transport closes, as aiohttp's own does

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class ConnectionCap:
    """At most ``limit`` connections; the oldest idle one makes room for a newcomer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[_Tracked, None] = {}  # in the order they were accepted
        self._busy: dict[RequestHandler, int] = {}
        self._server: web.Server | None = None

    def attach(self, server: web.Server) -> None:
        self._server = server

    @web.middleware
    async def track_busy(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Mark the connection busy while a request runs on it: it is never the one evicted."""
        protocol = request.protocol
        self._busy[protocol] = self._busy.get(protocol, 0) + 1
        try:
            response = await handler(request)
            # Sent here rather than after the handler returns, so that the connection
            # counts as busy until its answer's last byte is written.
            if not response.prepared:
                with contextlib.suppress(ConnectionError):
                    await response.prepare(request)
                    await response.write_eof()
            return response
        finally:
            left = self._busy.pop(protocol) - 1
            if left:
                self._busy[protocol] = left

    def protocol(self) -> asyncio.BaseProtocol:
        """The listening socket's protocol factory: a request handler, or a refusal."""
        assert self._server is not None, "attach() the runner's server first"
        if len(self._open) >= self.limit:
            busy = self._busy
            idle = next((t for t in self._open if t.handler not in busy), None)
            if idle is None:
                CONNECTIONS_REFUSED.inc()
                return _Refuse()
            CONNECTIONS_EVICTED.inc()
            self.closed(idle)  # its descriptor is released now, its callback comes later
            idle.evict()
        tracked = _Tracked(self._server(), self)
        self._open[tracked] = None
        return tracked

    def closed(self, tracked: _Tracked) -> None:
        self._open.pop(tracked, None)


class _MalformedRequests(logging.Filter):
    """Keeps aiohttp from logging each malformed request with a traceback.

    The client already has its 400; on a LAN anyone could otherwise flood the journal
    with one request line of garbage after another.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, HttpProcessingError)


_MALFORMED_REQUESTS = _MalformedRequests()


class CappedSite(web.BaseSite):
    """A TCP site whose connections pass through a :class:`ConnectionCap`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, cap: ConnectionCap) -> None:
        super().__init__(runner)
        self._host, self._port, self._cap = host, port, cap

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            # nginx's backlog: a burst of connects waits in the kernel, not refused.
            self._cap.protocol,
            self._host,
            self._port,
            reuse_address=True,
            backlog=511,
        )


async def start_listening(app: web.Application, settings: Settings) -> web.AppRunner:
    """Set up ``app`` and listen on the configured port; OSError when the port is taken."""
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED_REQUESTS)  # once, however often
    cap = ConnectionCap(connection_limit(settings.http.max_connections))
    # Outermost: busy from the first middleware until the error envelope's last byte too.
    app.middlewares.insert(0, cap.track_busy)
    runner = web.AppRunner(
        app,
        # Cancel a handler when its client goes away, so its generation stops at once.
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=settings.http.header_timeout_s,
    )
    await runner.setup()
    assert runner.server is not None
    cap.attach(runner.server)
    try:
        await CappedSite(runner, settings.host, settings.port, cap).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
