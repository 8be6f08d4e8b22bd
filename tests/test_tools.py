"""Tool calling through the openai SDK against a real daemon and the default model."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import Daemon

pytestmark = pytest.mark.slow

WEATHER_SCHEMA = {
    "type": "object",
    # Bounded so that a forced call ends well within the tests' small max_tokens.
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_SCHEMA,
    },
}
ADD_SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
ADD = {
    "type": "function",
    "function": {"name": "add", "description": "Add two integers", "parameters": ADD_SCHEMA},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    """Current weather in a city."""

    city: str = Field(max_length=12)


def sdk(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/infer/openai/v1", api_key="none", max_retries=0)


def async_sdk(daemon: Daemon) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{daemon.url}/infer/openai/v1", api_key="none", max_retries=0
    )


def test_a_required_call_has_arguments_that_match_the_schema(daemon: Daemon) -> None:
    response = sdk(daemon).chat.completions.create(
        model="",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=48,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)


async def test_a_named_choice_calls_that_tool(daemon: Daemon) -> None:
    response = await async_sdk(daemon).chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "What is two plus three?"}],
        tools=[WEATHER, ADD],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=48,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD_SCHEMA)


def test_without_parallel_calls_a_required_choice_makes_one_call(daemon: Daemon) -> None:
    response = sdk(daemon).chat.completions.create(
        model="",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, ADD],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=48,
        temperature=0,
    )
    assert response.choices[0].message.tool_calls
    assert len(response.choices[0].message.tool_calls) == 1


def test_a_streamed_call_sends_id_and_name_first_then_arguments(daemon: Daemon) -> None:
    stream = sdk(daemon).chat.completions.create(
        model="",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=48,
        temperature=0,
        stream=True,
    )
    parts, contents, finish = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            parts += choice.delta.tool_calls or []
            contents.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert parts[0].index == 0 and parts[0].id and parts[0].function
    assert parts[0].function.name == "get_weather"
    assert all(p.id is None for p in parts[1:])
    arguments = "".join(p.function.arguments or "" for p in parts if p.function)
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)
    assert "".join(contents) == ""  # the call's JSON never arrives as content
    assert finish == "tool_calls"


def test_the_sdk_stream_helper_reassembles_the_call(daemon: Daemon) -> None:
    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    with sdk(daemon).chat.completions.stream(
        model="",
        messages=ASK,  # type: ignore[arg-type]
        tools=[tool],
        tool_choice="required",
        max_tokens=48,
        temperature=0,
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [e.name for e in done] == ["get_weather"]
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    parsed = choice.message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, Weather)


def test_streamed_and_whole_answers_agree_with_tools_on_auto(daemon: Daemon) -> None:
    request: dict[str, Any] = {
        "model": "",
        "messages": ASK,
        "tools": [WEATHER],
        "max_tokens": 32,
        "temperature": 0,
    }
    whole = sdk(daemon).chat.completions.create(**request).choices[0]
    content, names, arguments, finish = "", [], "", None
    for chunk in sdk(daemon).chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for part in choice.delta.tool_calls or []:
                if part.function and part.function.name:
                    names.append(part.function.name)
                arguments += (part.function.arguments or "") if part.function else ""
            finish = choice.finish_reason or finish
    assert finish == whole.finish_reason
    assert content == (whole.message.content or "")
    calls = whole.message.tool_calls or []
    assert names == [c.function.name for c in calls]
    assert arguments == "".join(c.function.arguments for c in calls)


def test_a_conversation_with_a_call_and_its_result_is_answered(daemon: Daemon) -> None:
    messages: list[dict[str, Any]] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"},
    ]
    response = sdk(daemon).chat.completions.create(
        model="",
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=16,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.message.content
    assert choice.message.tool_calls in (None, [])
    assert choice.finish_reason in ("stop", "length")


def test_the_record_holds_the_calls(daemon: Daemon) -> None:
    response = sdk(daemon).chat.completions.create(
        model="",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=48,
        temperature=0,
        user="tool-record-test",
    )
    with urllib.request.urlopen(f"{daemon.url}/logs?limit=20", timeout=30) as answer:
        records = json.load(answer)["data"]
    [record] = [r for r in records if r["in"].get("user") == "tool-record-test"]
    logged = json.loads(record["out"]["json"])
    assert response.choices[0].message.tool_calls
    assert logged["choices"][0]["message"]["tool_calls"][0]["id"] == (
        response.choices[0].message.tool_calls[0].id
    )
    assert record["status"] == "ok"


async def test_the_vllm_backend_refuses_tools_naming_them(make_client: Any) -> None:
    client = await make_client(backend="vllm")
    body = {"messages": ASK, "tools": [WEATHER], "max_tokens": 4}
    response = await client.post("/infer/openai/v1/chat/completions", json=body)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "tools"
    # With tool_choice none the tools are not offered, so nothing stands in the way.
    response = await client.post(
        "/infer/openai/v1/chat/completions", json={**body, "tool_choice": "none"}
    )
    assert response.status == 200
