"""Concurrent requests get exactly their own text; cancels free their slot; the loop stays free."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from edge_agent.server.state import STATE_KEY
from tests.conftest import RecordingSink
from tests.logbook.logbook_helpers import wait_for

CHAT = "/infer/openai/v1/chat/completions"
COMPLETIONS = "/infer/openai/v1/completions"
NO_END = {"0": -100, "1": -100, "2": -100}  # end-of-text tokens away: runs to max_tokens
QUESTIONS = [
    "Tell me a story about a robot.",
    "What is the capital of France?",
    "Write a poem about the sea.",
    "Explain gravity to a child.",
    "List three fruits and their colors.",
    "Who wrote Hamlet?",
    "What is 2+2? Explain.",
    "Describe a cat in detail.",
]


async def chat_text(client: Any, question: str, max_tokens: int = 48) -> str:
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    response = await client.post(CHAT, json=body)
    assert response.status == 200
    return str((await response.json())["choices"][0]["message"]["content"])


async def test_concurrent_greedy_requests_get_exactly_their_solo_text(make_client: Any) -> None:
    client = await make_client(parallel=8, prefix_cache=False)
    alone = [await chat_text(client, q) for q in QUESTIONS]
    together = await asyncio.gather(*(chat_text(client, q) for q in QUESTIONS))
    assert together == alone


async def test_more_requests_than_slots_queue_and_all_finish(make_client: Any) -> None:
    client = await make_client(parallel=2, max_queue=8)
    alone = [await chat_text(client, q, 16) for q in QUESTIONS[:5]]
    together = await asyncio.gather(*(chat_text(client, q, 16) for q in QUESTIONS[:5]))
    assert together == alone


async def test_prefix_reuse_keeps_greedy_text_the_same(make_client: Any) -> None:
    """A long shared system prompt is reused from the KV cache; the text must not change."""
    system = "You are a careful assistant for a factory floor. " * 30  # > 4 prefill chunks
    body: dict[str, Any] = {"max_tokens": 32, "temperature": 0}

    def messages(question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]

    cold_client = await make_client(parallel=1, prefix_cache=False)
    cold = await (
        await cold_client.post(CHAT, json={**body, "messages": messages("Name a tool.")})
    ).json()
    warm_client = await make_client(parallel=1, prefix_cache=True)
    await warm_client.post(CHAT, json={**body, "messages": messages("Name a color.")})
    warm = await (
        await warm_client.post(CHAT, json={**body, "messages": messages("Name a tool.")})
    ).json()
    assert warm["choices"][0]["message"] == cold["choices"][0]["message"]


async def test_a_follow_up_turn_reusing_the_cached_answer_keeps_the_text(
    make_client: Any,
) -> None:
    """The second turn's prompt holds the first turn's answer, whose KV was made token by
    token while generating; reusing it must give the text a cold prefill gives."""
    first: list[dict[str, str]] = [{"role": "user", "content": "Name a planet."}]
    body: dict[str, Any] = {"max_tokens": 24, "temperature": 0}

    async def follow_up(client: Any) -> str:
        answer = await (await client.post(CHAT, json={**body, "messages": first})).json()
        turn = [
            *first,
            {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
            {"role": "user", "content": "Tell me more about it."},
        ]
        second = await (await client.post(CHAT, json={**body, "messages": turn})).json()
        return str(second["choices"][0]["message"]["content"])

    cold = await follow_up(await make_client(parallel=1, prefix_cache=False))
    warm = await follow_up(await make_client(parallel=1, prefix_cache=True))
    assert warm == cold


async def test_a_long_prompt_arriving_mid_stream_does_not_disturb_it(make_client: Any) -> None:
    client = await make_client(parallel=4)
    backend = client.app[STATE_KEY].backend
    question = QUESTIONS[0]
    alone = await chat_text(client, question, 64)
    before = backend.decode_steps

    async def long_prompt_later() -> None:
        # Mid-stream: once the first request is decoding, however slow the machine is.
        await wait_for(lambda: backend.decode_steps > before + 2)
        await chat_text(client, "Summarize: " + "the plant runs three shifts. " * 120, 8)

    together, _ = await asyncio.gather(chat_text(client, question, 64), long_prompt_later())
    assert together == alone


async def test_a_cancelled_stream_frees_its_slot_and_spares_the_others(make_client: Any) -> None:
    sink = RecordingSink()
    client = await make_client(parallel=2, records=sink)
    state = client.app[STATE_KEY]
    neighbour_alone = await chat_text(client, QUESTIONS[1], 48)
    body = {
        "prompt": "Tell me a long story.",
        "max_tokens": 1000,
        "stream": True,
        "logit_bias": NO_END,
    }

    async def abandon() -> None:
        response = await client.post(COMPLETIONS, json=body)
        for _ in range(5):
            await response.content.readline()
        response.close()  # the client goes away mid-generation

    neighbour, _ = await asyncio.gather(chat_text(client, QUESTIONS[1], 48), abandon())
    assert neighbour == neighbour_alone
    await asyncio.wait_for(state.scheduler.wait_idle(), 5)
    assert state.scheduler.in_flight == 0
    steps = state.backend.decode_steps
    await asyncio.sleep(0.3)
    assert state.backend.decode_steps == steps, "nothing decodes once every client is gone"
    cancelled = [r for r in sink.records if r["status"] == "cancelled"]
    assert len(cancelled) == 1
    made = cancelled[0]["metrics"]["completion_tokens"]
    assert 0 < made < 1000
    assert json.loads(cancelled[0]["out"]["json"])["usage"]["completion_tokens"] == made


async def test_healthz_answers_quickly_during_a_long_generation(make_client: Any) -> None:
    client = await make_client(parallel=1)
    body = {"prompt": "Tell me a story.", "max_tokens": 300, "logit_bias": NO_END}
    backend = client.app[STATE_KEY].backend
    before = backend.decode_steps
    generation = asyncio.create_task(client.post(COMPLETIONS, json=body))
    await wait_for(lambda: backend.decode_steps > before)  # the generation is under way
    latencies = []
    for _ in range(10):
        started = time.perf_counter()
        assert (await client.get("/healthz")).status == 200
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.02)
    assert not generation.done(), "the generation must still be running while we measure"
    assert max(latencies) < 0.05, latencies
    await generation


async def test_a_q8_0_key_cache_keeps_greedy_text_the_same_alone_and_batched(
    make_client: Any,
) -> None:
    """A quantized KV cache changes the numbers, but not batch invariance: still deterministic."""
    client = await make_client(parallel=4, prefix_cache=False, kv_cache_type="q8_0")
    alone = [await chat_text(client, q, 24) for q in QUESTIONS[:4]]
    together = await asyncio.gather(*(chat_text(client, q, 24) for q in QUESTIONS[:4]))
    assert together == alone
    assert all(alone)
