"""The connection cap on its own: a plain aiohttp app behind ``start_listening``, real sockets."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from edge_agent.config import Settings
from edge_agent.server.listener import start_listening
from tests.conftest import free_port
from tests.raw_http import exchange

CAP = 4
GET = b"GET /hold HTTP/1.1\r\nHost: box\r\n\r\n"


class Box:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = 0
        self.all_holding = asyncio.Event()
        self.port = free_port()

    async def hold(self, request: web.Request) -> web.Response:
        self.holding += 1
        if self.holding == CAP:
            self.all_holding.set()
        await self.release.wait()
        return web.Response(text="done")

    async def quick(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    box = Box()
    app = web.Application()
    app.router.add_get("/hold", box.hold)
    app.router.add_get("/quick", box.quick)
    settings = Settings(host="127.0.0.1", port=box.port, http={"max_connections": CAP})
    runner = await start_listening(app, settings)
    yield box
    box.release.set()
    await runner.cleanup()


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 10) == b""


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(f"edge_agent_http_connections_{name}_total") or 0.0


async def test_idle_connections_make_room_for_a_newcomer(box: Box) -> None:
    evicted = counted("evicted")
    idle = [await asyncio.open_connection("127.0.0.1", box.port) for _ in range(3 * CAP)]
    answer = await exchange("127.0.0.1", box.port, b"GET /quick HTTP/1.1\r\nHost: b\r\n\r\n")
    assert answer is not None and answer.status == 200
    # Each newcomer past the cap closed the oldest idle one: the first 2 * CAP + 1 are gone.
    outcomes = [await closed(reader) for reader, _ in idle[: 2 * CAP + 1]]
    assert all(outcomes)
    assert counted("evicted") - evicted == 2 * CAP + 1
    for _, writer in idle:
        writer.close()


async def test_with_every_connection_busy_a_newcomer_gets_a_503(box: Box) -> None:
    busy = [await asyncio.open_connection("127.0.0.1", box.port) for _ in range(CAP)]
    for _, writer in busy:
        writer.write(GET)
    await asyncio.wait_for(box.all_holding.wait(), 10)
    before = counted("refused")
    refused = await exchange("127.0.0.1", box.port, GET)
    assert counted("refused") - before == 1
    assert refused is not None and refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert json.loads(refused.body)["error"]["code"] == "too_many_connections"
    # The busy ones are untouched: each gets its answer.
    box.release.set()
    for reader, writer in busy:
        head = await asyncio.wait_for(reader.readline(), 10)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()


def test_the_cap_fits_the_descriptor_limit() -> None:
    # In a child process: the limit it lowers is its own.
    code = (
        "import resource\n"
        "from edge_agent.server.listener import RESERVED_FDS, connection_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))\n"
        "print(connection_limit(100), connection_limit(1000), 300 - RESERVED_FDS)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    fits, lowered, room = out.stdout.splitlines()[-1].split()
    assert "max_connections_lowered" in out.stdout
    assert fits == "100" and lowered == room
