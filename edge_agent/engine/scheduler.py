"""Admission, deadlines, stop strings and the clock between the HTTP layer and a backend.

ttft and tps are measured here, once, and the same numbers go to the response,
the inference log and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field

from edge_agent.engine.errors import DeadlineExceeded, QueueFull, ShuttingDown
from edge_agent.engine.stopping import StopMatcher
from edge_agent.engine.types import (
    Backend,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationRequest,
    TokenEvent,
)


@dataclass
class GenerationClock:
    """Times one request (all its choices) from acceptance by the daemon."""

    accepted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: int = 0

    def token(self) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.completion_tokens += 1

    @property
    def ttft(self) -> float | None:
        if self.first_token_at is None:
            return None
        return self.first_token_at - self.accepted_at

    @property
    def tps(self) -> float | None:
        if self.last_token_at is None or self.completion_tokens == 0:
            return None
        elapsed = self.last_token_at - self.accepted_at
        return self.completion_tokens / elapsed if elapsed > 0 else None

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.accepted_at


@dataclass(frozen=True, slots=True)
class Step:
    """What one backend event means for the client: text to send, and maybe the end."""

    text: str
    token: TokenEvent | None
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None


class Scheduler:
    """Bounds the work in flight and runs each sequence against the backend."""

    def __init__(self, backend: Backend, *, max_queue: int, request_timeout_s: float) -> None:
        self.backend = backend
        self._capacity = backend.info.parallel + max_queue
        self._max_queue = max_queue
        self._timeout = request_timeout_s
        self.in_flight = 0  # sequences admitted: decoding or waiting for a slot
        # Embedding requests: one embeds while the others wait, apart from the slots.
        self.embeddings_in_flight = 0
        # Mean seconds a sequence holds a slot (moving average): what a refused client
        # should wait. A guess of a few seconds until the first sequence has finished.
        self.mean_sequence_s = 2.0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def reconfigure(self, *, max_queue: int, request_timeout_s: float) -> None:
        """Apply a reloaded queue bound and deadline to requests admitted from now on."""
        self._capacity = self.backend.info.parallel + max_queue
        self._max_queue = max_queue
        self._timeout = request_timeout_s

    @property
    def queued(self) -> int:
        return max(0, self.in_flight - self.backend.info.parallel)

    def estimated_wait_s(self) -> float:
        """About how long until a slot frees for one more sequence."""
        parallel = self.backend.info.parallel
        rounds = (self.queued + parallel) / parallel  # the queue ahead, shared by the slots
        return self.mean_sequence_s * rounds

    @contextlib.contextmanager
    def admit(self, sequences: int) -> Iterator[None]:
        """Reserve room for a request's sequences, or refuse it (ShuttingDown, QueueFull)."""
        if self.draining:
            raise ShuttingDown()
        if self.in_flight + sequences > self._capacity:
            raise QueueFull(in_flight=self.in_flight, estimated_wait_s=self.estimated_wait_s())
        self.in_flight += sequences
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= sequences
            self._note_idle()

    def _note_idle(self) -> None:
        if self.in_flight == 0 and self.embeddings_in_flight == 0:
            self._idle.set()

    async def embed(self, request: EmbeddingRequest, *, clock: GenerationClock) -> EmbeddingResult:
        """One embedding request, under the same refusals and deadline as a sequence."""
        if self.draining:
            raise ShuttingDown()
        if self.embeddings_in_flight > self._max_queue:
            raise QueueFull(in_flight=self.embeddings_in_flight, estimated_wait_s=1.0)
        self.embeddings_in_flight += 1
        self._idle.clear()
        try:
            remaining = clock.accepted_at + self._timeout - time.perf_counter()
            async with asyncio.timeout(max(remaining, 0)):
                return await self.backend.embed(request)
        except TimeoutError:
            raise DeadlineExceeded(self._timeout) from None
        finally:
            self.embeddings_in_flight -= 1
            self._note_idle()

    async def wait_idle(self) -> None:
        """Return once no sequence is in flight."""
        await self._idle.wait()

    async def drain(self, grace_s: float) -> bool:
        """Refuse new work and wait for what is in flight; True if it all finished."""
        self.draining = True
        try:
            await asyncio.wait_for(self.wait_idle(), grace_s)
            return True
        except TimeoutError:
            return False

    async def run(
        self,
        request: GenerationRequest,
        *,
        stops: Sequence[str],
        clock: GenerationClock,
    ) -> AsyncGenerator[Step, None]:
        """One sequence's steps; the last carries finish_reason. Closing it cancels."""
        matcher = StopMatcher(stops)
        deadline = clock.accepted_at + self._timeout
        events = self.backend.generate(request)
        started = time.perf_counter()
        try:
            while True:
                remaining = deadline - time.perf_counter()
                try:
                    async with asyncio.timeout(remaining if remaining > 0 else 0):
                        event = await anext(events)
                except TimeoutError:
                    raise DeadlineExceeded(self._timeout) from None
                except StopAsyncIteration:
                    return
                if event.token_id is not None:
                    clock.token()
                text = matcher.feed(event.text)
                if matcher.matched is not None:
                    yield Step(text, event, "stop", matcher.matched)
                    return
                if event.finish_reason is not None:
                    yield Step(text + matcher.flush(), event, event.finish_reason)
                    return
                yield Step(text, event)
        finally:
            await events.aclose()
            self.mean_sequence_s += 0.2 * (time.perf_counter() - started - self.mean_sequence_s)
