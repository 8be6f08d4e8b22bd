"""The scheduler's own rules, without a model: admission, deadlines, stop strings, the clock.

The backend here is a small scripted object following the Backend protocol; the
scheduler is the only thing under test (the real backends are tested against the
real model elsewhere).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence

import pytest

from edge_agent.engine.errors import DeadlineExceeded, QueueFull, ShuttingDown
from edge_agent.engine.scheduler import GenerationClock, Scheduler, Step
from edge_agent.engine.types import (
    BackendInfo,
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    ToolSpec,
)


class ScriptedBackend:
    """Yields the scripted texts one token each; ``gate`` holds each token until it is set."""

    def __init__(self, texts: Sequence[str], *, parallel: int = 1, end: bool = True) -> None:
        self.texts = list(texts)
        self.end = end
        self.gate = asyncio.Event()
        self.gate.set()
        self.closed = 0
        self.embedding_arrived: asyncio.Queue[None] = asyncio.Queue()
        self._info = BackendInfo("llamacpp", context_length=64, parallel=parallel)

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    @property
    def tool_call_format(self) -> None:
        return None

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        add_generation_prompt: bool = True,
    ) -> str:
        return "".join(m.content for m in messages)

    def check_supported(self, params: SamplingParams) -> None:
        return None

    def tokenize_for_embedding(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        self.embedding_arrived.put_nowait(None)
        await self.gate.wait()
        return EmbeddingResult(tuple((float(len(tokens)),) for tokens in request.inputs))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        try:
            for i, text in enumerate(self.texts):
                await self.gate.wait()
                last = self.end and i == len(self.texts) - 1
                yield TokenEvent(i, text, "length" if last else None)
            if not self.end:  # never ends by itself: only a deadline or a close does
                await asyncio.Event().wait()
        finally:
            self.closed += 1


def request() -> GenerationRequest:
    return GenerationRequest("r", [1, 2], SamplingParams(max_tokens=8))


def scheduler(backend: ScriptedBackend, *, max_queue: int = 0, timeout: float = 60) -> Scheduler:
    return Scheduler(backend, max_queue=max_queue, request_timeout_s=timeout)


async def steps_of(s: Scheduler, stops: Sequence[str] = ()) -> list[Step]:
    return [step async for step in s.run(request(), stops=stops, clock=GenerationClock())]


# --- admission ---------------------------------------------------------------------------


def test_admission_holds_room_for_every_sequence_and_frees_it() -> None:
    s = scheduler(ScriptedBackend([], parallel=2), max_queue=1)
    with s.admit(3):
        assert (s.in_flight, s.queued) == (3, 1)
    assert s.in_flight == 0


def test_past_slots_plus_queue_is_queue_full_with_an_estimated_wait() -> None:
    s = scheduler(ScriptedBackend([], parallel=2), max_queue=1)
    with s.admit(2), pytest.raises(QueueFull) as refused:
        with s.admit(2):
            pass
    assert refused.value.in_flight == 2 and refused.value.estimated_wait_s > 0
    assert s.in_flight == 0, "a refused request holds nothing"


def test_a_longer_queue_means_a_longer_estimated_wait() -> None:
    s = scheduler(ScriptedBackend([], parallel=1), max_queue=4)
    with s.admit(1):
        short = s.estimated_wait_s()
        with s.admit(3):
            assert s.estimated_wait_s() > short


def test_draining_refuses_new_work() -> None:
    s = scheduler(ScriptedBackend([]))
    s.draining = True
    with pytest.raises(ShuttingDown), s.admit(1):
        pass


async def test_drain_waits_for_what_is_in_flight() -> None:
    s = scheduler(ScriptedBackend([]))
    admitted = s.admit(1)
    admitted.__enter__()
    drained = asyncio.create_task(s.drain(grace_s=30))
    await asyncio.sleep(0)
    assert not drained.done() and s.draining
    admitted.__exit__(None, None, None)
    assert await drained is True


async def test_drain_gives_up_after_the_grace_period() -> None:
    s = scheduler(ScriptedBackend([]))
    with s.admit(1):
        assert await s.drain(grace_s=0.01) is False


def test_reconfigure_changes_the_queue_bound_for_new_admissions() -> None:
    s = scheduler(ScriptedBackend([]), max_queue=0)
    s.reconfigure(max_queue=1, request_timeout_s=60)
    with s.admit(2):
        assert s.queued == 1


# --- running a sequence ------------------------------------------------------------------------


async def test_steps_carry_the_text_and_the_last_the_finish_reason() -> None:
    steps = await steps_of(scheduler(ScriptedBackend(["a", "b", "c"])))
    assert [s.text for s in steps] == ["a", "b", "c"]
    assert [s.finish_reason for s in steps] == [None, None, "length"]


async def test_a_stop_string_ends_the_sequence_and_is_not_sent() -> None:
    backend = ScriptedBackend(["Hel", "lo, wo", "rld", "!"])
    steps = await steps_of(scheduler(backend), stops=["o, w"])
    assert "".join(s.text for s in steps) == "Hell"
    assert (steps[-1].finish_reason, steps[-1].stop_reason) == ("stop", "o, w")
    assert backend.closed == 1, "the backend's sequence is closed at once"


async def test_held_back_text_is_flushed_when_no_stop_follows() -> None:
    steps = await steps_of(scheduler(ScriptedBackend(["ab", "c"])), stops=["cd"])
    assert "".join(s.text for s in steps) == "abc"


async def test_a_sequence_past_its_deadline_raises_and_closes() -> None:
    backend = ScriptedBackend(["a"], end=False)
    s = scheduler(backend, timeout=0.05)
    with pytest.raises(DeadlineExceeded) as late:
        await steps_of(s)
    assert late.value.deadline_s == 0.05
    assert backend.closed == 1


async def test_the_deadline_counts_from_acceptance_not_from_the_first_token() -> None:
    backend = ScriptedBackend(["a", "b"])
    backend.gate.clear()  # waiting for a slot, as it were
    s = scheduler(backend, timeout=0.05)
    clock = GenerationClock()
    with pytest.raises(DeadlineExceeded):
        async for _ in s.run(request(), stops=(), clock=clock):
            pass
    assert clock.completion_tokens == 0


async def test_closing_the_run_early_closes_the_backend_sequence() -> None:
    backend = ScriptedBackend(["a", "b", "c"])
    run = scheduler(backend).run(request(), stops=(), clock=GenerationClock())
    assert (await anext(run)).text == "a"
    await run.aclose()
    assert backend.closed == 1


async def test_finished_sequences_teach_the_wait_estimate() -> None:
    s = scheduler(ScriptedBackend(["a"]))
    before = s.mean_sequence_s
    await steps_of(s)
    assert s.mean_sequence_s < before, "a sequence that took no time lowers the estimate"


# --- the clock ---------------------------------------------------------------------------------


def test_a_clock_without_tokens_has_no_ttft_and_no_tps() -> None:
    clock = GenerationClock()
    assert (clock.ttft, clock.tps, clock.completion_tokens) == (None, None, 0)


def test_ttft_is_to_the_first_token_and_tps_counts_to_the_last() -> None:
    clock = GenerationClock(accepted_at=time.perf_counter() - 1.0)
    clock.token()
    clock.token()
    assert clock.ttft is not None and 1.0 <= clock.ttft < 2.0
    assert clock.tps is not None and 1.0 < clock.tps <= 2.0
    assert clock.completion_tokens == 2


async def test_only_events_with_a_token_are_counted() -> None:
    class EndsBare(ScriptedBackend):
        async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
            yield TokenEvent(5, "x")
            yield TokenEvent(None, "", "stop")  # end of sequence: no token made

    clock = GenerationClock()
    s = scheduler(EndsBare([]))
    steps = [step async for step in s.run(request(), stops=(), clock=clock)]
    assert clock.completion_tokens == 1 and steps[-1].finish_reason == "stop"


# --- embedding requests ----------------------------------------------------------------------


def embedding() -> EmbeddingRequest:
    return EmbeddingRequest("e", [[1, 2, 3], [4]])


async def test_an_embedding_request_gets_its_vectors() -> None:
    s = scheduler(ScriptedBackend([]))
    result = await s.embed(embedding(), clock=GenerationClock())
    assert result.vectors == ((3.0,), (1.0,))
    assert s.embeddings_in_flight == 0


async def test_embeddings_beyond_the_queue_bound_are_refused_apart_from_the_slots() -> None:
    backend = ScriptedBackend([])
    backend.gate.clear()
    s = scheduler(backend, max_queue=1)
    waiting = [asyncio.create_task(s.embed(embedding(), clock=GenerationClock())) for _ in "ab"]
    for _ in waiting:
        await backend.embedding_arrived.get()
    with pytest.raises(QueueFull):
        await s.embed(embedding(), clock=GenerationClock())
    with s.admit(1):  # the generation slot is still free for a sequence
        assert s.in_flight == 1
    backend.gate.set()
    await asyncio.gather(*waiting)


async def test_drain_waits_for_an_embedding_and_then_refuses_them() -> None:
    backend = ScriptedBackend([])
    backend.gate.clear()
    s = scheduler(backend)
    task = asyncio.create_task(s.embed(embedding(), clock=GenerationClock()))
    await backend.embedding_arrived.get()
    draining = asyncio.create_task(s.drain(grace_s=30))
    await asyncio.sleep(0)
    assert not draining.done()
    backend.gate.set()
    assert await draining is True
    assert (await task).vectors
    with pytest.raises(ShuttingDown):
        await s.embed(embedding(), clock=GenerationClock())


async def test_an_embedding_past_the_deadline_is_stopped() -> None:
    backend = ScriptedBackend([])
    backend.gate.clear()
    s = scheduler(backend, timeout=0.01)
    with pytest.raises(DeadlineExceeded):
        await s.embed(embedding(), clock=GenerationClock())
