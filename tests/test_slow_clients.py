"""Slow and malicious clients are contained: the connection cap, the head deadline, stalls.

The cap and the head deadline live in the listening socket that ``edge-agent serve``
sets up, so those tests run the real daemon; the stalled stream runs in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from edge_agent.protocol.edge import OPENAI_PREFIX
from tests.conftest import GUARDED_CAP, Daemon, RecordingSink

Client = TestClient[web.Request, web.Application]
CHAT = f"{OPENAI_PREFIX}/chat/completions"
PARTIAL_HEAD = b"POST /infer/openai/v1/completions HTTP/1.1\r\nHost: box\r\n"


def closed_by_server(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def sockets_held(daemon: Daemon) -> int:
    """Sockets open in the daemon process (its descriptors, as /proc lists them)."""
    fds = Path(f"/proc/{daemon.process.pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


def completion(daemon: Daemon) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{daemon.url}{OPENAI_PREFIX}/completions",
        data=json.dumps({"prompt": "Hello", "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        answer: dict[str, Any] = json.loads(response.read())
        return answer


@pytest.mark.slow
def test_more_idle_sockets_than_the_cap_cannot_take_the_port(guarded_daemon: Daemon) -> None:
    daemon, crowd = guarded_daemon, 200
    before = sockets_held(daemon)
    sockets = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(crowd)]
    try:
        for sock in sockets[::2]:
            sock.sendall(PARTIAL_HEAD)  # half of them start a request and never finish it
        assert completion(daemon)["choices"][0]["text"] is not None
        # The newcomers pushed the oldest idle connections out (well within the head
        # deadline): the daemon holds no more than the cap, however many connected.
        assert sockets_held(daemon) - before <= GUARDED_CAP
        assert any(map(closed_by_server, sockets))
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.slow
def test_a_connection_that_never_finishes_its_head_is_closed(guarded_daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", guarded_daemon.port)) as sock:
        sock.sendall(PARTIAL_HEAD)
        sock.settimeout(30)
        assert sock.recv(1024) == b""  # closed by the daemon, without an answer
    completion(guarded_daemon)


async def stalled_stream(host: str, port: int) -> socket.socket:
    """A streaming request from a client that reads nothing: a tiny receive window."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Write a long story about the sea."}],
            "max_tokens": 2000,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,  # large events: the buffers fill in a few tokens
            "logit_bias": {"0": -100, "1": -100, "2": -100},  # no end of text
        }
    ).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: box\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    await asyncio.get_running_loop().sock_sendall(sock, head.encode() + body)
    return sock


class SignallingSink(RecordingSink):
    """Records kept in memory, with an event set on each one."""

    def __init__(self) -> None:
        super().__init__()
        self.appended = asyncio.Event()

    async def append(self, record: dict[str, Any]) -> None:
        await super().append(record)
        self.appended.set()


async def normal_stream(client: Client) -> str:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 32}
    response = await client.post(CHAT, json={**body, "stream": True})
    assert response.status == 200
    text = await response.text()
    assert text.endswith("data: [DONE]\n\n")
    return text


async def test_a_stalled_reader_is_ended_and_recorded_while_others_stream(
    make_client: Callable[..., Any],
) -> None:
    records = SignallingSink()
    client: Client = await make_client(
        records=records, http={"stream_stall_s": 3, "write_buffer_bytes": 4096}
    )
    stalled = await stalled_stream(str(client.server.host), int(client.server.port or 0))
    try:
        streams = await asyncio.gather(*(normal_stream(client) for _ in range(3)))
        # The three finished while the stalled one was still held: it slowed none of them.
        assert all('"finish_reason":' in s for s in streams)
        assert [r["status"] for r in records.records] == ["ok"] * 3
        async with asyncio.timeout(120):
            while len(records.records) < 4:
                await records.appended.wait()
                records.appended.clear()
        stall = records.records[-1]
        assert stall["status"] == "cancelled"
        assert "read nothing" in stall["error"]
        assert 0 < stall["metrics"]["completion_tokens"] < 2000
    finally:
        stalled.close()
