"""OpenAI shapes from engine steps, without a model: chunks, usage, the assembled response."""

from __future__ import annotations

import time

from edge_agent.engine.scheduler import GenerationClock, Step
from edge_agent.engine.types import GenerationRequest, SamplingParams, TokenEvent, TopLogprob
from edge_agent.server.openai_requests import Endpoint, PreparedRequest
from edge_agent.server.openai_responses import (
    ChatResponses,
    CompletionResponses,
    ResponseBuilder,
    response_builder,
)
from edge_agent.server.params import EffectiveParams

PIECES = {1: "Hel", 2: "lo", 3: "!"}


def prepared(
    endpoint: Endpoint, *, n: int = 1, logprobs: int | None = None, echo: bool = False
) -> PreparedRequest:
    sequence = GenerationRequest("r", [9, 9], SamplingParams(max_tokens=4))
    return PreparedRequest(
        endpoint=endpoint,
        request_id="r",
        params=EffectiveParams(n=n),
        sequences=[sequence] * n,
        prompt_texts=["Say"] * n,
        prompt_tokens=2 * n,
        stops=[],
        stream=True,
        include_usage=False,
        logprobs=logprobs,
        echo=echo,
    )


def builder(endpoint: Endpoint, **kwargs: object) -> ResponseBuilder:
    surface = ChatResponses if endpoint == "chat/completions" else CompletionResponses
    return surface(prepared(endpoint, **kwargs), "m", PIECES.__getitem__)  # type: ignore[arg-type]


def step(token: int, finish: str | None = None) -> Step:
    event = TokenEvent(token, PIECES[token], None, -0.5, (TopLogprob(PIECES[token], -0.5),))
    return Step(PIECES[token], event, finish)  # type: ignore[arg-type]


def clock_with(tokens: int) -> GenerationClock:
    clock = GenerationClock(accepted_at=time.perf_counter() - 1)
    for _ in range(tokens):
        clock.token()
    return clock


def test_the_surface_is_chosen_by_the_endpoint() -> None:
    assert isinstance(response_builder(prepared("chat/completions"), "m", None), ChatResponses)  # type: ignore[arg-type]
    assert isinstance(response_builder(prepared("completions"), "m", None), CompletionResponses)  # type: ignore[arg-type]


def test_ids_carry_the_surface_prefix() -> None:
    assert builder("chat/completions").id.startswith("chatcmpl-")
    assert builder("completions").id.startswith("cmpl-")


def test_a_chat_stream_opens_with_the_assistant_role_for_each_choice() -> None:
    (opening,) = builder("chat/completions", n=2).opening_chunks()
    assert [c.delta.model_dump() for c in opening.choices] == [
        {"role": "assistant", "content": ""}
    ] * 2


def test_a_completion_stream_opens_with_nothing_or_the_echo() -> None:
    assert list(builder("completions").opening_chunks()) == []
    (echo,) = builder("completions", echo=True).opening_chunks()
    assert echo.choices[0].text == "Say"


def test_every_chunk_of_a_stream_has_the_same_id_and_created() -> None:
    b = builder("chat/completions")
    chunks = [*b.opening_chunks(), b.step_chunk(0, step(1)), b.usage_chunk(b.usage(clock_with(1)))]
    assert {(c.id, c.created) for c in chunks} == {(b.id, b.created)}


def test_the_finishing_chat_chunk_has_no_empty_content() -> None:
    b = builder("chat/completions")
    end = Step("", TokenEvent(None, "", "stop"), "stop")
    chunk = b.step_chunk(0, end)
    assert chunk.choices[0].delta.content is None and chunk.choices[0].finish_reason == "stop"


def test_usage_counts_the_prompt_and_the_clock_tokens() -> None:
    usage = builder("completions").usage(clock_with(3))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2, 3, 5)
    assert usage.ttft is not None and usage.tps is not None


def test_the_response_assembles_each_choice_text_and_finish_reason() -> None:
    b = builder("completions", n=2)
    for index in (0, 1):
        b.add(index, step(1))
        b.add(index, step(2, "length" if index else "stop"))
    response = b.response(clock_with(4))
    assert [c.text for c in response.choices] == ["Hello", "Hello"]
    assert [c.finish_reason for c in response.choices] == ["stop", "length"]


def test_echo_puts_the_prompt_before_the_text() -> None:
    b = builder("completions", echo=True)
    b.add(0, step(1))
    assert b.response(clock_with(1)).choices[0].text == "SayHel"


def test_chat_logprobs_list_each_token_with_its_bytes() -> None:
    b = builder("chat/completions", logprobs=1)
    b.add(0, step(1))
    b.add(0, step(3, "stop"))
    logprobs = b.response(clock_with(2)).choices[0].logprobs
    assert logprobs is not None
    assert [(t.token, t.bytes) for t in logprobs.content] == [("Hel", list(b"Hel")), ("!", [33])]


def test_completion_logprobs_offsets_follow_the_text_after_the_echo() -> None:
    b = builder("completions", logprobs=1, echo=True)
    b.add(0, step(1))
    b.add(0, step(2))
    logprobs = b.response(clock_with(2)).choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["Hel", "lo"] and logprobs.text_offset == [3, 6]
    assert logprobs.top_logprobs == [{"Hel": -0.5}, {"lo": -0.5}]


def test_a_streamed_step_carries_only_its_own_logprobs() -> None:
    b = builder("completions", logprobs=0)
    b.add(0, step(1))
    first = b.step_chunk(0, step(1))
    b.add(0, step(2))
    second = b.step_chunk(0, step(2))
    assert first.choices[0].logprobs is not None and second.choices[0].logprobs is not None
    assert first.choices[0].logprobs.tokens == ["Hel"]
    assert second.choices[0].logprobs.tokens == ["lo"]
    assert second.choices[0].logprobs.text_offset == [3]
