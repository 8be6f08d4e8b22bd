"""SSE keep-alive: comment lines while a stream waits for its first token, and only then."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

import openai
from aiohttp import web

from edge_agent.server.sse import KEEP_ALIVE, SseWriter, keep_alive

COMPLETIONS = "/infer/openai/v1/completions"


def split_stream(body: bytes) -> tuple[int, list[bytes]]:
    """How many keep-alive comments came before the first data event, and the data events."""
    assert body.endswith(b"\n\n")
    events = body.split(b"\n\n")[:-1]
    first_data = next(i for i, event in enumerate(events) if event.startswith(b"data: "))
    comments = events[:first_data]
    assert all(event + b"\n\n" == KEEP_ALIVE for event in comments), comments
    rest = events[first_data:]
    assert all(event.startswith(b"data: ") for event in rest), "no comment after the first token"
    return len(comments), [event[len(b"data: ") :] for event in rest]


def gated_app(release: asyncio.Event, closed: asyncio.Event) -> web.Application:
    async def items() -> AsyncGenerator[bytes, None]:
        try:
            await release.wait()
            yield b'"first"'
            yield b'"second"'
        finally:
            closed.set()

    async def handler(request: web.Request) -> web.StreamResponse:
        writer = SseWriter(request)
        await writer.start()
        async for item in keep_alive(items(), writer, interval_s=0.01):
            await writer.send(item)
        return await writer.done()

    app = web.Application()
    app.router.add_get("/", handler)
    return app


async def test_comments_flow_until_the_first_item_then_stop(aiohttp_client: Any) -> None:
    release, closed = asyncio.Event(), asyncio.Event()
    client = await aiohttp_client(gated_app(release, closed))
    response = await client.get("/")
    # The handler is waiting for its first item: what arrives meanwhile is a comment.
    assert await response.content.readline() == b": keep-alive\n"
    release.set()
    comments, data = split_stream(b": keep-alive\n" + await response.read())
    assert comments >= 1
    assert data == [b'"first"', b'"second"', b"[DONE]"]
    assert closed.is_set()


async def test_a_client_gone_while_waiting_ends_the_wait(aiohttp_client: Any) -> None:
    release, closed = asyncio.Event(), asyncio.Event()
    client = await aiohttp_client(gated_app(release, closed))
    response = await client.get("/")
    assert await response.content.readline() == b": keep-alive\n"
    response.close()
    # The next comment finds the socket closed: the wait is cancelled, its work closed.
    await asyncio.wait_for(closed.wait(), timeout=30)
    assert not release.is_set()


async def test_a_queued_stream_gets_keep_alives_and_the_sdk_ignores_them(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client(parallel=1, sse_ping_s=0.02)
    # One slot, held by a long generation (end of text banned so it runs its length).
    busy = await client.post(
        COMPLETIONS,
        json={
            "prompt": "Once upon a time",
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
            "logit_bias": {"0": -100, "1": -100, "2": -100},
        },
    )
    # Its first token means it holds the slot (it may have had comments before it too).
    while not (await busy.content.readline()).startswith(b"data: "):
        pass
    prompt, max_tokens = "The factory opened", 8
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    sdk = openai.AsyncOpenAI(
        base_url=str(client.make_url("/infer/openai/v1")), api_key="none", max_retries=0
    )

    async def raw() -> bytes:
        response = await client.post(COMPLETIONS, json={**body, "stream": True})
        assert response.status == 200
        answer: bytes = await response.read()
        return answer

    async def through_sdk() -> str:
        stream = await sdk.completions.create(
            model="", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    raw_body, sdk_text = await asyncio.gather(raw(), through_sdk())
    await busy.read()
    comments, data = split_stream(raw_body)
    assert comments >= 1, "the queued stream waited a whole generation without a comment"
    assert data[-1] == b"[DONE]"
    raw_text = "".join(json.loads(event)["choices"][0]["text"] for event in data[:-1])
    assert sdk_text == raw_text and raw_text
