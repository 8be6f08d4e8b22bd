"""Tool calls in chat chunks and responses, from engine steps, without a model."""

from __future__ import annotations

import json
import time

from edge_agent.engine.scheduler import GenerationClock, Step
from edge_agent.engine.types import GenerationRequest, SamplingParams, ToolSpec
from edge_agent.protocol.openai import ChatCompletionChunk
from edge_agent.server.openai_requests import PreparedRequest
from edge_agent.server.openai_responses import ChatResponses
from edge_agent.server.openai_tools import ToolUse
from edge_agent.server.params import EffectiveParams

TOOLS = ToolUse("generic", (ToolSpec("get_weather"),), parallel=True, forced=None)
CALL_TEXT = '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}'


def builder() -> ChatResponses:
    sequence = GenerationRequest("r", [9], SamplingParams(max_tokens=64))
    prepared = PreparedRequest(
        endpoint="chat/completions",
        request_id="r",
        params=EffectiveParams(),
        sequences=[sequence],
        prompt_texts=["x"],
        prompt_tokens=1,
        stops=[],
        stream=True,
        include_usage=False,
        logprobs=None,
        echo=False,
        tools=TOOLS,
    )
    return ChatResponses(prepared, "m", str)


def run(text: str, pieces: int = 5) -> tuple[ChatResponses, list[ChatCompletionChunk]]:
    """Feed ``text`` in ``pieces`` steps, the last one ending the sequence."""
    chat = builder()
    size = -(-len(text) // pieces)
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    chunks: list[ChatCompletionChunk] = []
    for i, part in enumerate(parts):
        step = Step(part, None, "stop" if i == len(parts) - 1 else None)
        chat.add(0, step)
        chunks += [c for c in chat.step_chunks(0, step) if isinstance(c, ChatCompletionChunk)]
    return chat, chunks


def clock() -> GenerationClock:
    return GenerationClock(accepted_at=time.perf_counter())


def test_a_call_streams_its_id_and_name_first_then_its_arguments() -> None:
    _, chunks = run(CALL_TEXT)
    deltas = [c.choices[0].delta for c in chunks]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].index == 0 and calls[0].id and calls[0].type == "function"
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == ""
    assert all(c.id is None and c.function.name is None for c in calls[1:])
    assert json.loads("".join(c.function.arguments for c in calls)) == {"city": "Paris"}
    assert not any(d.content for d in deltas)  # no markup leaks into the content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_response_holds_the_call_and_no_content() -> None:
    chat, _ = run(CALL_TEXT)
    choice = chat.response(clock()).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")


def test_the_streamed_and_assembled_calls_agree() -> None:
    chat, chunks = run(CALL_TEXT)
    first = next(c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls)
    assert first is not None
    assert first[0].id == chat.response(clock()).choices[0].message.tool_calls[0].id


def test_plain_text_with_tools_offered_is_content() -> None:
    chat, chunks = run("It is sunny in Paris.")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is sunny in Paris."
    choice = chat.response(clock()).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == "It is sunny in Paris."
    assert choice.message.tool_calls == []


def test_plain_chunks_carry_no_tool_calls_field() -> None:
    _, chunks = run("Hello")
    assert all("tool_calls" not in c.model_dump_json() for c in chunks)
