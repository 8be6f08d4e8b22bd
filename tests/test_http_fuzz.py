"""A seeded raw-HTTP fuzzer against the real daemon: malformed request lines, headers, framing.

Each case is a valid request put through a few random mutations and sent on a socket
of its own. Whatever the bytes, the answer is never a 5xx, and the daemon serves a
real completion afterwards. Bounded by a case count and a deadline.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections import Counter

import pytest

from edge_agent.protocol.edge import OPENAI_PREFIX
from tests.conftest import Daemon

pytestmark = pytest.mark.slow

SEED = 20261204
CASES = 3000
DEADLINE_S = 12.0
WORKERS = 12
ANSWER_WITHIN_S = 3.0

_COMPLETION = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
_CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
BASES: list[tuple[str, str, bytes]] = [
    ("POST", f"{OPENAI_PREFIX}/completions", _COMPLETION),
    ("POST", f"{OPENAI_PREFIX}/chat/completions", _CHAT),
    ("POST", "/logs", b'{"limit": 2}'),
    ("GET", "/logs?limit=2", b""),
    ("GET", "/models", b""),
    ("GET", "/readyz", b""),
    ("POST", "/infer", b'[{"text": "Hi"}]'),
]
METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "CONNECT", "TRACE",
           "G\x00T", "", "POST POST", "\xff\xfe", "P" * 300, "get", "PRI"]  # fmt: skip
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.1x", "HTTP/", "",
            "HTTP/01.1", "HTTP/1.1 extra", "http/1.1", "HTTP/9.9", "HTTP/1.1\x00"]  # fmt: skip
PATHS = ["/" * 5000, "/%zz", "/logs?limit=%ff", "/logs?limit=-1&since=%00", "/../../etc/passwd",
         "*", "http://evil/", "/\xe9\xff", "/infer/openai/v1/completions?x=" + "y" * 9000,
         "/pipelines/%2e%2e", "/logs?limit=99999999999999999999", "", " ", "/a b"]  # fmt: skip
HEADERS = [
    "Host: a\r\nHost: b", "NoColonHere", " Leading: space", "Bad Name: x", "X: \x00",
    "X-Folded: a\r\n continued", "X-Big: " + "x" * 9000, "Content-Length: -1",
    "Content-Length: 1,1", "Content-Length: 0x10", "Content-Length: 99999999999999999999",
    "Content-Length:  3 ", "Content-Length: 100000000", "Transfer-Encoding: chunked",
    "Transfer-Encoding: chunked, gzip", "Transfer-Encoding: xchunked",
    "Transfer-Encoding: identity", "Content-Encoding: gzip", "Content-Encoding: br",
    "Content-Encoding: deflate", "Expect: 100-continue",
    "Connection: Upgrade\r\nUpgrade: websocket",
    "Content-Type: text/plain", "Content-Type: application/json; charset=latin-1",
    "Content-Type: \xff", "Authorization: Bearer \xe9\xe9", "Authorization: Basic Zm9vOmJhcg==",
    "Accept-Encoding: *", "X-\xff: y", ":", "Cookie: " + "a=b; " * 2000,
]  # fmt: skip
BODIES = [b"{", b"[" * 20_000, b'{"prompt": NaN}', b'{"a":1,"a":2}', b"\xff" * 64,
          b"0\r\n\r\n", b"zz\r\n", b"5\r\nabc", b'{"prompt": "' + b"x" * 70_000 + b'"}', b"",
          b"null"]  # fmt: skip
ENDINGS = ["\r\n", "\n", "\r", "\r\r\n"]


def build(rng: random.Random) -> bytes:
    method, path, body = rng.choice(BASES)
    version, ending = "HTTP/1.1", "\r\n"
    headers = ["Host: box", "Connection: close"]
    if body:
        headers += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(7)
        if kind == 0:
            method = rng.choice(METHODS)
        elif kind == 1:
            path = rng.choice(PATHS)
        elif kind == 2:
            version = rng.choice(VERSIONS)
        elif kind == 3:
            headers.insert(rng.randrange(len(headers) + 1), rng.choice(HEADERS))
        elif kind == 4 and headers:
            headers.pop(rng.randrange(len(headers)))
        elif kind == 5:
            body = rng.choice(BODIES)
        else:
            ending = rng.choice(ENDINGS)
    head = f"{method} {path} {version}{ending}" + "".join(h + ending for h in headers) + ending
    raw = bytearray(head.encode("latin-1", errors="replace") + body)
    for _ in range(rng.choice([0, 0, 1, 3])):  # and a few flipped bytes anywhere
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    return bytes(raw)


async def status_of(port: int, raw: bytes) -> int | None:
    """The status the daemon answers, or None when it closes or keeps waiting for more."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return -1  # refused at connect: the port was lost
    try:
        writer.write(raw)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), ANSWER_WITHIN_S)
    except (TimeoutError, ConnectionError):
        return None
    finally:
        writer.close()
    parts = line.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def test_random_malformed_requests_never_get_a_5xx(guarded_daemon: Daemon) -> None:
    daemon = guarded_daemon  # short head and body deadlines, a small connection cap
    rng = random.Random(SEED)
    cases = [build(rng) for _ in range(CASES)]
    statuses: Counter[int | None] = Counter()
    offenders: list[tuple[int, bytes]] = []

    async def fuzz() -> None:
        queue = list(enumerate(cases))[::-1]
        deadline = time.monotonic() + DEADLINE_S

        async def worker() -> None:
            while queue and time.monotonic() < deadline:
                _, raw = queue.pop()
                status = await status_of(daemon.port, raw)
                statuses[status] += 1
                if status is not None and (status >= 500 or status < 0):
                    offenders.append((status, raw[:200]))

        await asyncio.gather(*(worker() for _ in range(WORKERS)))

    asyncio.run(fuzz())
    print(f"fuzz: {sum(statuses.values())} cases, statuses {dict(statuses)}")
    assert sum(statuses.values()) >= 300
    assert not offenders, offenders[:5]
    assert daemon.process.poll() is None
    # A client's garbage is its own 400, not a traceback per request in the journal.
    journal = daemon.log_path.read_text(errors="replace")
    assert "Error handling request" not in journal and "unhandled_error" not in journal
    # ...and the daemon still serves real work.
    request = urllib.request.Request(
        f"{daemon.url}{OPENAI_PREFIX}/completions",
        data=_COMPLETION,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
