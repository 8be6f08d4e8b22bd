"""The product doc's details: the request's own parameters beside usage, /pipelines' version."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai

from edge_agent.manifest import ModelManifest
from tests.conftest import RecordingSink

COMPLETIONS = "/infer/openai/v1/completions"


def sdk(client: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(client.make_url("/infer/openai/v1")), api_key="none", max_retries=0
    )


async def test_the_body_carries_the_parameters_as_given(make_client: Callable[..., Any]) -> None:
    sink = RecordingSink()
    client = await make_client(records=sink)
    response = await sdk(client).completions.create(
        model="dummy",
        prompt="tell me a short story",
        max_tokens=4,
        temperature=0,
        stop=["\n"],
        extra_body={"my_tag": {"a": 1}},
    )
    given = (response.model_extra or {})["request_params"]
    assert given == {
        "model": "dummy",
        "max_tokens": 4,
        "temperature": 0,
        "stop": ["\n"],
        "my_tag": {"a": 1},
    }
    # The record's response is the one sent: the parameters are in it too.
    assert json.loads(sink.records[0]["out"]["json"])["request_params"] == given


async def test_a_stream_carries_them_once_beside_usage(make_client: Callable[..., Any]) -> None:
    client = await make_client()
    stream = await sdk(client).chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    carrying = [c for c in chunks if (c.model_extra or {}).get("request_params") is not None]
    assert carrying == [chunks[-1]] and chunks[-1].choices == [] and chunks[-1].usage
    assert (chunks[-1].model_extra or {})["request_params"] == {
        "model": "",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_without_include_usage_they_ride_the_finish_chunk(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client()
    stream = await sdk(client).completions.create(
        model="m", prompt="hello", max_tokens=3, stream=True
    )
    chunks = [chunk async for chunk in stream]
    carrying = [c for c in chunks if (c.model_extra or {}).get("request_params") is not None]
    assert len(carrying) == 1 and carrying[0].choices[0].finish_reason is not None
    assert carrying[0].usage is not None
    assert (carrying[0].model_extra or {})["request_params"]["max_tokens"] == 3


async def test_pipelines_carry_their_version(
    make_client: Callable[..., Any], manifest: ModelManifest
) -> None:
    client = await make_client(pipeline="line-7")
    answer = await (await client.get("/pipelines")).json()
    assert answer == {
        "pipelines": [{"id": "line-7", "status": "Running", "version": manifest.version}]
    }
