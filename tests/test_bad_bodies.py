"""Every bad body is a 400-class answer, never a 500: raw bytes on a socket, one row each.

Rows that reach a handler get the OpenAI envelope; rows that aiohttp's own parser
refuses before any handler runs (broken framing in the head) get its plain 400.
The model is left unloaded: each of these is refused before any inference would run.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from edge_agent.protocol.edge import OPENAI_PREFIX
from edge_agent.server.state import STATE_KEY
from tests.raw_http import RawResponse, exchange

Client = TestClient[web.Request, web.Application]
COMPLETIONS = f"{OPENAI_PREFIX}/completions"
CHAT = f"{OPENAI_PREFIX}/chat/completions"
EMBEDDINGS = f"{OPENAI_PREFIX}/embeddings"
JSON = "application/json"
BODY_TIMEOUT_S = 1.0
MAX_BODY = 1024 * 1024


def post(path: str, body: bytes, *, content_type: str | None = JSON, extra: str = "") -> bytes:
    """A well-framed POST of ``body``; ``extra`` adds header lines."""
    head = f"POST {path} HTTP/1.1\r\nHost: box\r\nConnection: close\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    head += f"Content-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def framed(path: str, headers: str, body: bytes, *, close: bool = True) -> bytes:
    """A POST whose framing headers are exactly ``headers``: for lying lengths and chunks."""
    head = f"POST {path} HTTP/1.1\r\nHost: box\r\nContent-Type: {JSON}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + headers + "\r\n").encode() + body


PROMPT = b'{"prompt": "hi", '
DEEP = b"[" * 100_000 + b"]" * 100_000

# (name, raw request, expected status, param; "parser" where aiohttp answers before us)
ROWS: list[tuple[str, bytes, int, str | None]] = [
    ("deeply nested arrays", post(CHAT, DEEP), 400, None),
    ("deeply nested in a field", post(COMPLETIONS, PROMPT + b'"x": ' + DEEP + b"}"), 400, None),
    ("nested objects", post(CHAT, b'{"a":' * 50_000 + b"1" + b"}" * 50_000), 400, None),
    ("integer past 64 bits", post(COMPLETIONS, PROMPT + b'"seed": ' + b"9" * 30 + b"}"), 400, None),
    (
        "integer of 5000 digits",
        post(COMPLETIONS, PROMPT + b'"n": ' + b"7" * 5000 + b"}"),
        400,
        None,
    ),
    ("float overflowing", post(COMPLETIONS, PROMPT + b'"temperature": 1e999}'), 400, None),
    ("NaN", post(COMPLETIONS, PROMPT + b'"temperature": NaN}'), 400, None),
    ("Infinity", post(COMPLETIONS, PROMPT + b'"top_p": Infinity}'), 400, None),
    ("-Infinity in an unknown field", post(COMPLETIONS, PROMPT + b'"x": -Infinity}'), 400, None),
    ("duplicate keys", post(COMPLETIONS, b'{"prompt": "a", "prompt": "b"}'), 400, None),
    (
        "duplicate nested keys",
        post(CHAT, b'{"messages": [{"role": "user", "role": "x"}]}'),
        400,
        None,
    ),
    ("a JSON array", post(COMPLETIONS, b'["prompt"]'), 400, None),
    ("a JSON string", post(COMPLETIONS, b'"prompt"'), 400, None),
    ("a JSON number", post(CHAT, b"42"), 400, None),
    ("JSON null", post(CHAT, b"null"), 400, None),
    ("an empty body", post(COMPLETIONS, b""), 400, None),
    ("whitespace only", post(COMPLETIONS, b"  \n "), 400, None),
    ("trailing garbage", post(COMPLETIONS, b'{"prompt": "hi"} {}'), 400, None),
    ("embeddings: NaN", post(EMBEDDINGS, b'{"input": "hi", "x": NaN}'), 400, None),
    (
        "embeddings: text/plain",
        post(EMBEDDINGS, b'{"input": "hi"}', content_type="text/plain"),
        400,
        None,
    ),
    ("tokenize: duplicate keys", post("/tokenize", b'{"prompt": "a", "prompt": "b"}'), 400, None),
    ("detokenize: deeply nested", post("/detokenize", DEEP), 400, None),
    ("not UTF-8", post(COMPLETIONS, b'{"prompt": "\xff\xfe"}'), 400, None),
    ("a lone surrogate escape", post(COMPLETIONS, b'{"prompt": "\\ud800"}'), 400, None),
    ("text/plain", post(COMPLETIONS, b'{"prompt": "hi"}', content_type="text/plain"), 400, None),
    (
        "a form",
        post(COMPLETIONS, b"prompt=hi", content_type="application/x-www-form-urlencoded"),
        400,
        None,
    ),
    (
        "multipart",
        post(CHAT, b"--b\r\n\r\nx\r\n--b--", content_type="multipart/form-data; boundary=b"),
        400,
        None,
    ),
    (
        "over the size limit",
        post(COMPLETIONS, b'{"prompt": "' + b"x" * MAX_BODY + b'"}'),
        413,
        None,
    ),
    (
        "gzip that is not gzip",
        post(COMPLETIONS, b"not gzip at all", extra="Content-Encoding: gzip\r\n"),
        400,
        None,
    ),
    (
        "gzip of NaN",
        post(
            COMPLETIONS, gzip.compress(PROMPT + b'"seed": NaN}'), extra="Content-Encoding: gzip\r\n"
        ),
        400,
        None,
    ),
    (
        "Content-Length shorter than the body",
        framed(COMPLETIONS, "Content-Length: 5\r\n", b'{"prompt": "hi", "max_tokens": 2}'),
        400,
        "parser",  # the rest is data after "Connection: close"
    ),
    (
        "Content-Length shorter than the body, kept alive",
        framed(
            COMPLETIONS, "Content-Length: 5\r\n", b'{"prompt": "hi", "max_tokens": 2}', close=False
        ),
        400,
        "parser",  # the rest arrives with it, and is no request line
    ),
    ("Content-Length not a number", framed(CHAT, "Content-Length: ten\r\n", b"{}"), 400, "parser"),
    ("Content-Length negative", framed(CHAT, "Content-Length: -5\r\n", b"{}"), 400, "parser"),
    (
        "two different Content-Lengths",
        framed(CHAT, "Content-Length: 2\r\nContent-Length: 3\r\n", b"{}"),
        400,
        "parser",
    ),
    (
        "Content-Length and chunked together",
        framed(
            CHAT, "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"
        ),
        400,
        "parser",
    ),
    (
        "chunk size not hex",
        framed(COMPLETIONS, "Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
        400,
        "parser",
    ),
    (
        "chunk longer than its size",
        framed(COMPLETIONS, "Transfer-Encoding: chunked\r\n", b"2\r\n{}xx\r\n0\r\n\r\n"),
        400,
        "parser",
    ),
    (
        "chunked body cut short",
        framed(COMPLETIONS, "Transfer-Encoding: chunked\r\n", b"10\r\n{}", close=False),
        408,
        None,
    ),
    (
        "chunked NaN",
        framed(CHAT, "Transfer-Encoding: chunked\r\n", b"3\r\nNaN\r\n0\r\n\r\n"),
        400,
        None,
    ),
    (
        "unknown transfer coding",
        framed(CHAT, "Transfer-Encoding: rot13\r\n", b"{}"),
        400,
        "parser",
    ),
    ("POST /logs with NaN", post("/logs", b'{"limit": NaN}'), 400, None),
    ("POST /logs with a form", post("/logs", b"limit=5", content_type="text/plain"), 400, None),
]


@pytest.fixture
async def box(make_client: Callable[..., Any]) -> Client:
    client: Client = await make_client(
        wait=False,
        load_gate=asyncio.Event(),
        max_request_bytes=MAX_BODY,
        http={"body_timeout_s": BODY_TIMEOUT_S},
    )
    return client


async def stored(client: Client) -> list[dict[str, Any]]:
    store = client.app[STATE_KEY].log_store
    assert store is not None
    records, _ = await store.read(limit=100)
    return records


async def send(client: Client, raw: bytes, **kwargs: Any) -> RawResponse | None:
    server = client.server
    return await exchange(str(server.host), int(server.port or 0), raw, **kwargs)


def assert_refused(response: RawResponse | None, status: int, param: str | None) -> None:
    assert response is not None, "the server closed without an answer"
    assert response.status == status, response.body[:300]
    if param == "parser":  # aiohttp's parser: no handler ran, a plain 400 is the answer
        return
    assert response.headers["content-type"].startswith("application/json")
    error = json.loads(response.body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


@pytest.mark.parametrize(
    ("raw", "status", "param"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS]
)
async def test_a_bad_body_is_refused_with_its_envelope(
    box: Client, raw: bytes, status: int, param: str | None
) -> None:
    client = box
    assert_refused(await send(client, raw), status, param)
    # ...and the daemon goes on serving.
    assert (await client.get("/healthz")).status == 200


async def test_a_refused_inference_body_leaves_one_record(
    box: Client,
) -> None:
    client = box
    assert_refused(await send(client, post(COMPLETIONS, PROMPT + b'"seed": NaN}')), 400, None)
    [record] = await stored(client)
    assert record["status"] == "error" and "NaN" in record["error"]
    assert record["in"] == (PROMPT + b'"seed": NaN}').decode()  # kept as the text received


async def test_a_body_shorter_than_its_length_times_out_with_408(
    box: Client,
) -> None:
    client = box
    raw = framed(COMPLETIONS, "Content-Length: 100\r\n", b'{"prompt": "hi"')
    response = await send(client, raw, within_s=BODY_TIMEOUT_S + 10)
    assert response is not None and response.status == 408
    assert json.loads(response.body)["error"]["type"] == "invalid_request_error"
    assert [r["status"] for r in await stored(client)] == ["error"]


async def test_a_body_cut_off_by_the_client_is_never_a_500(
    box: Client,
) -> None:
    client = box
    raw = framed(COMPLETIONS, "Content-Length: 100\r\n", b'{"prompt": "hi"')
    response = await send(client, raw, half_close=True, within_s=BODY_TIMEOUT_S + 10)
    # The client said it is done: nothing to answer (closed), or a 400-class envelope.
    assert response is None or 400 <= response.status < 500
    assert (await client.get("/healthz")).status == 200
