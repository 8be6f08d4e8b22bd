"""The openai SDK and the product doc's curl payloads against a real `edge-agent serve`."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import openai
import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"

# The product documentation's edge examples, byte for byte (shared/reference).
DOC_CHAT_STREAM = (
    b'{"model": "whatever", "messages": [{"role": "user", "content": "you are a story teller"}], '
    b'"max_tokens": 100, "stream": true}'
)
DOC_CHAT = (
    b'{"model": "whatever", "messages": [{"role": "user", "content": "you are a story teller"}], '
    b'"max_tokens": 100}'
)
DOC_COMPLETION_STREAM = (
    b'{"model": "whatever", "prompt": "tell me a short story", "max_tokens": 100, "stream": true}'
)
DOC_COMPLETION = b'{"model": "whatever", "prompt": "tell me a short story", "max_tokens": 100}'


def sdk(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/infer/openai/v1", api_key="none", max_retries=0)


def post(daemon: Daemon, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        daemon.url + path, data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, dict(response.headers), response.read()


def test_models_list(daemon: Daemon) -> None:
    models = sdk(daemon).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion(daemon: Daemon) -> None:
    response = sdk(daemon).chat.completions.create(
        model="", messages=[{"role": "user", "content": "you are a story teller"}], max_tokens=20
    )
    assert response.model == MODEL
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage is not None and response.usage.completion_tokens <= 20
    extra = response.usage.model_extra or {}
    assert extra["ttft"] > 0 and extra["tps"] > 0


def test_chat_completion_stream(daemon: Daemon) -> None:
    stream = sdk(daemon).chat.completions.create(
        model="dummy",
        messages=[{"role": "user", "content": "this is a short story about love"}],
        max_tokens=20,
        stream=True,
    )
    text, finishes, usages = "", [], []
    for chunk in stream:  # the doc's plain loop: chunk.choices[0] must always be safe
        text += chunk.choices[0].delta.content or ""
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert text and len(finishes) == 1 and len(usages) == 1


def test_chat_stream_with_include_usage(daemon: Daemon) -> None:
    stream = sdk(daemon).chat.completions.create(
        model="dummy",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5 or chunks[-2].choices[0].finish_reason == "stop"


def test_completion(daemon: Daemon) -> None:
    response = sdk(daemon).completions.create(
        model="", prompt="tell me a short story", max_tokens=20
    )
    assert response.object == "text_completion" and response.choices[0].text
    assert response.usage is not None and response.usage.total_tokens > 0


def test_completion_stream(daemon: Daemon) -> None:
    stream = sdk(daemon).completions.create(
        model="", prompt="tell me a short story", max_tokens=20, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert len({c.id for c in chunks}) == 1


async def test_async_client_chat_and_stream(daemon: Daemon) -> None:
    client = openai.AsyncOpenAI(
        base_url=f"{daemon.url}/infer/openai/v1", api_key="none", max_retries=0
    )
    whole = await client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    stream = await client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert streamed == whole.choices[0].message.content
    completion = await client.completions.create(model="x", prompt="Hi", max_tokens=3)
    assert completion.choices[0].text
    await client.close()


def test_sdk_errors_carry_the_message(daemon: Daemon) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(daemon).chat.completions.create(model="x", messages=[], max_tokens=3)
    assert "messages" in str(raised.value)
    body: Any = raised.value.body
    assert body["param"] == "messages" and body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "payload"),
    [("chat/completions", DOC_CHAT), ("completions", DOC_COMPLETION)],
    ids=["chat", "completions"],
)
def test_doc_payloads_replayed_verbatim(daemon: Daemon, path: str, payload: bytes) -> None:
    status, headers, raw = post(daemon, f"/infer/openai/v1/{path}", payload)
    body = json.loads(raw)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body["usage"]["completion_tokens"] <= 100
    assert body["usage"]["ttft"] > 0 and body["usage"]["tps"] > 0
    choice = body["choices"][0]
    assert (choice.get("message") or {}).get("content") or choice.get("text")


@pytest.mark.parametrize(
    ("path", "payload"),
    [("chat/completions", DOC_CHAT_STREAM), ("completions", DOC_COMPLETION_STREAM)],
    ids=["chat", "completions"],
)
def test_doc_stream_payloads_replayed_verbatim(daemon: Daemon, path: str, payload: bytes) -> None:
    status, headers, raw = post(daemon, f"/infer/openai/v1/{path}", payload)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")[:-1]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    usage = [c["usage"] for c in chunks if c["usage"]]
    assert len(usage) == 1 and usage[0]["ttft"] > 0 and usage[0]["tps"] > 0
