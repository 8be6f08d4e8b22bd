"""The wire format, run against both backends: a client cannot tell llama.cpp from vLLM.

Raw SSE framing (CONTRACT.md section 3) read byte for byte off the socket, usage
once, errors, cancellation, and the openai SDK. On this CPU-only machine the vLLM
backend runs with an engine double behind vLLM's real interface (tests/engine).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from edge_agent.server.state import STATE_KEY
from tests.conftest import RecordingSink
from tests.raw_http import HTTP_VERSIONS, RawResponse, post_json

COMPLETIONS = "/infer/openai/v1/completions"
CHAT = "/infer/openai/v1/chat/completions"


async def read_events(response: Any) -> list[str]:
    raw = (await response.read()).decode()
    assert raw.endswith("\n\n"), "every event ends with a blank line"
    events = raw.split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: ") :] for event in events]


def events_of(response: RawResponse) -> list[str]:
    """The SSE events of a raw response, checking the framing its HTTP version calls for."""
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    if response.version == "1.1":
        assert response.headers.get("transfer-encoding") == "chunked"
    else:
        # HTTP/1.0 has no chunked encoding: the server ends the body by closing.
        assert "transfer-encoding" not in response.headers
        assert "content-length" not in response.headers
        assert response.closed_by_server
    raw = response.body.decode()
    assert raw.endswith("\n\n"), "every event ends with a blank line"
    events = raw.split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: ") :] for event in events]


async def stream_raw(client: Any, path: str, body: dict[str, Any], version: str) -> list[str]:
    response = await post_json(
        client.server.host, client.server.port, path, body, http_version=version
    )
    assert response.version == version, "the server answers in the client's version"
    return events_of(response)


def chunks_of(events: list[str]) -> list[dict[str, Any]]:
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    return [json.loads(event) for event in events[:-1]]


@pytest.mark.parametrize("version", HTTP_VERSIONS)
async def test_chat_stream_framing(any_client: Any, version: str) -> None:
    # Temperature 0: the same tokens every run, so "exactly 6" cannot meet an early end.
    body = {
        "messages": [{"role": "user", "content": "Hi!"}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
    }
    chunks = chunks_of(await stream_raw(any_client, CHAT, body, version))
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1
    with_usage = [c for c in chunks if c["usage"] is not None]
    assert with_usage == finishing, "usage rides on the finish chunk without include_usage"
    usage = with_usage[0]["usage"]
    content_chunks = [c for c in chunks[1:] if c["choices"][0]["delta"]["content"]]
    assert usage["completion_tokens"] == 6 == len(content_chunks), "one event per token"
    assert usage["ttft"] > 0 and usage["tps"] > 0


@pytest.mark.parametrize("version", HTTP_VERSIONS)
async def test_completion_stream_with_include_usage(any_client: Any, version: str) -> None:
    body = {
        "prompt": "tell me a short story",
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = chunks_of(await stream_raw(any_client, COMPLETIONS, body, version))
    assert all(c["object"] == "text_completion" for c in chunks)
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1]), "usage exactly once"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]) == 1


async def test_streamed_text_equals_the_non_streamed_text(any_client: Any) -> None:
    body = {"prompt": "The moon is", "max_tokens": 12, "temperature": 0}
    whole = await (await any_client.post(COMPLETIONS, json=body)).json()
    chunks = chunks_of(
        await read_events(await any_client.post(COMPLETIONS, json={**body, "stream": True}))
    )
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["text"]


async def test_stream_log_record_holds_the_assembled_response(
    make_client: Any, backend_name: str
) -> None:
    sink = RecordingSink()
    client = await make_client(records=sink, backend=backend_name)
    body = {"prompt": "The moon is", "max_tokens": 4, "temperature": 0, "stream": True}
    chunks = chunks_of(await read_events(await client.post(COMPLETIONS, json=body)))
    assembled = json.loads(sink.records[0]["out"]["json"])
    assert assembled["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks)
    assert assembled["usage"] == chunks[-1]["usage"]


async def test_n_choices_stream_with_their_indexes(any_client: Any) -> None:
    body = {"prompt": "Once", "max_tokens": 3, "n": 2, "seed": 3, "stream": True}
    chunks = chunks_of(await read_events(await any_client.post(COMPLETIONS, json=body)))
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]
    assert sum(1 for c in chunks if c["usage"]) == 1


@pytest.mark.parametrize("version", HTTP_VERSIONS)
async def test_a_failure_mid_stream_is_an_error_event_then_done(
    make_client: Any, version: str
) -> None:
    """The deadline, as the failure: a clean error in the stream, and the slot is free again."""
    sink = RecordingSink()
    client = await make_client(request_timeout_s=0.3, parallel=1, records=sink)
    state = client.app[STATE_KEY]
    # End-of-text tokens biased away: only the deadline can end this one.
    body = {
        "prompt": "Tell me everything.",
        "max_tokens": 2000,
        "stream": True,
        "logit_bias": {"0": -100, "1": -100, "2": -100},
    }
    events = await stream_raw(client, COMPLETIONS, body, version)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["code"] == "timeout"
    assert error["error"]["type"] == "server_error"
    assert [r["status"] for r in sink.records] == ["error"]
    assert state.scheduler.in_flight == 0
    steps = state.backend.decode_steps
    await asyncio.sleep(0.2)
    assert state.backend.decode_steps <= steps + 1, "it stops within one decode step"
    # The only slot serves the next request.
    after = await client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2})
    assert after.status == 200


async def test_bad_input_gets_the_same_envelope(any_client: Any) -> None:
    response = await any_client.post(CHAT, json={"messages": [], "stream": True})
    assert response.status == 400
    body = await response.json()
    assert body["error"]["param"] == "messages"
    assert body["error"]["type"] == "invalid_request_error"


async def test_a_disconnect_cancels_and_is_logged(make_client: Any, backend_name: str) -> None:
    sink = RecordingSink()
    client = await make_client(records=sink, backend=backend_name)
    state = client.app[STATE_KEY]
    body = {
        "prompt": "Tell me a story.",
        "max_tokens": 500,
        "stream": True,
        "logit_bias": {"0": -100, "1": -100, "2": -100},  # no early end of text
    }
    response = await client.post(COMPLETIONS, json=body)
    await response.content.readline()
    response.close()
    await asyncio.wait_for(state.scheduler.wait_idle(), 5)
    for _ in range(100):  # the record is written as the cancelled handler unwinds
        if sink.records:
            break
        await asyncio.sleep(0.01)
    assert [r["status"] for r in sink.records] == ["cancelled"]


async def test_the_openai_sdk_streams_and_not(any_client: Any) -> None:
    sdk = openai.AsyncOpenAI(
        base_url=str(any_client.make_url("/infer/openai/v1")), api_key="none", max_retries=0
    )
    messages: Any = [{"role": "user", "content": "Say hello."}]
    whole = await sdk.chat.completions.create(
        model="x", messages=messages, max_tokens=8, temperature=0
    )
    stream = await sdk.chat.completions.create(
        model="x", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        whole.choices[0].message.content
    )
    assert sum(1 for c in chunks if c.usage is not None) == 1
    models = await sdk.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m-instruct"]
    await sdk.close()
