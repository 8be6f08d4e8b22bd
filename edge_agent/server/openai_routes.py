"""POST /infer/openai/v1/completions and /chat/completions, streamed or not."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from edge_agent.engine.errors import EngineError
from edge_agent.engine.scheduler import GenerationClock, Step
from edge_agent.errors import ApiError, OpenAIDisabled
from edge_agent.observability import observe_request
from edge_agent.protocol.edge import OPENAI_PREFIX
from edge_agent.protocol.openai import ModelCard, ModelList
from edge_agent.server.engine_errors import as_api_error
from edge_agent.server.openai_requests import Endpoint, PreparedRequest, parse_request, prepare
from edge_agent.server.openai_responses import ResponseBuilder
from edge_agent.server.params import model_defaults
from edge_agent.server.records import build_record, request_body_for_log
from edge_agent.server.sse import SseWriter
from edge_agent.server.state import AppState, state_of
from edge_agent.server.wire import json_response

log = structlog.get_logger(__name__)

PREFIX = OPENAI_PREFIX


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completions")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat/completions")


async def list_models(request: web.Request) -> web.Response:
    state = state_of(request)
    if not state.manifest.openai.enabled:
        raise OpenAIDisabled()
    card = ModelCard(id=state.manifest.name, created=int(state.started_at))
    return json_response(ModelList(data=[card]))


class _Outcome:
    """What the request's log record and metrics say, filled in as the request goes."""

    def __init__(self) -> None:
        self.status = "ok"
        self.error: str | None = None
        self.response_json: str | None = None
        self.params: dict[str, Any] = {}
        self.prompt_tokens = 0
        self.logged = False


async def _serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = state_of(request)
    clock = GenerationClock()
    accepted_ms = int(time.time() * 1000)
    request_id = uuid.uuid4().hex
    raw = await request.read()
    outcome = _Outcome()

    async def commit_record() -> None:
        """Make the record durable; called before the response's last byte is sent."""
        if outcome.logged:
            return
        outcome.logged = True
        record = build_record(
            state,
            endpoint=endpoint,
            accepted_ms=accepted_ms,
            body=request_body_for_log(raw),
            response_json=outcome.response_json,
            params=outcome.params,
            clock=clock,
            prompt_tokens=outcome.prompt_tokens,
            status=outcome.status,
            error=outcome.error,
        )
        await state.records.append(record)

    try:
        if not state.manifest.openai.enabled:
            raise OpenAIDisabled()
        parsed = parse_request(endpoint, raw)
        state.require_ready()
        prepared = await prepare(
            endpoint,
            parsed,
            request_id=request_id,
            backend=state.backend,
            defaults=model_defaults(state.manifest, endpoint),
        )
        outcome.params = prepared.params.for_log()
        outcome.prompt_tokens = prepared.prompt_tokens
        with state.scheduler.admit(len(prepared.sequences)):
            builder = ResponseBuilder(prepared, state.manifest.name, state.backend)
            if prepared.stream:
                return await _stream(
                    request, state, prepared, builder, clock, outcome, commit_record
                )
            return await _respond(state, prepared, builder, clock, outcome, commit_record)
    except ApiError as error:
        outcome.status, outcome.error = "error", error.message
        await commit_record()
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        outcome.status, outcome.error = "cancelled", "client disconnected"
        await asyncio.shield(commit_record())
        raise
    except EngineError as exc:
        mapped = as_api_error(exc)
        outcome.status, outcome.error = "error", mapped.message
        await commit_record()
        raise mapped from None
    finally:
        _finish_log(state, endpoint, request_id, clock, outcome)


async def _respond(
    state: AppState,
    prepared: PreparedRequest,
    builder: ResponseBuilder,
    clock: GenerationClock,
    outcome: _Outcome,
    commit_record: Callable[[], Awaitable[None]],
) -> web.Response:
    async for index, step in _choices(state, prepared, clock):
        builder.add(index, step)
    body = builder.response(clock).model_dump_json()
    outcome.response_json = body
    await commit_record()
    return web.Response(text=body, content_type="application/json")


async def _stream(
    request: web.Request,
    state: AppState,
    prepared: PreparedRequest,
    builder: ResponseBuilder,
    clock: GenerationClock,
    outcome: _Outcome,
    commit_record: Callable[[], Awaitable[None]],
) -> web.StreamResponse:
    writer = SseWriter(request)
    await writer.start()
    for opening in (builder.opening_chunk(), builder.echo_chunk()):
        if opening is not None:
            await writer.send(opening)
    remaining = len(prepared.sequences)
    try:
        async for index, step in _choices(state, prepared, clock):
            builder.add(index, step)
            if step.finish_reason is None:
                if step.text or prepared.logprobs is not None:
                    await writer.send(builder.step_chunk(index, step))
                continue
            remaining -= 1
            if remaining:
                await writer.send(builder.step_chunk(index, step))
                continue
            # The last choice finished: the record is durable before its chunk leaves.
            usage = builder.usage(clock)
            outcome.response_json = builder.response(clock).model_dump_json()
            await commit_record()
            if prepared.include_usage:
                await writer.send(builder.step_chunk(index, step))
                await writer.send(builder.usage_chunk(usage))
            else:
                await writer.send(builder.step_chunk(index, step, usage))
    except ApiError as error:
        outcome.status, outcome.error = "error", error.message
        outcome.response_json = builder.response(clock).model_dump_json()
        await commit_record()
        await writer.send(error.envelope())
    except EngineError as exc:
        mapped = as_api_error(exc)
        outcome.status, outcome.error = "error", mapped.message
        outcome.response_json = builder.response(clock).model_dump_json()
        await commit_record()
        await writer.send(mapped.envelope())
    except (asyncio.CancelledError, ConnectionResetError):
        outcome.status, outcome.error = "cancelled", "client disconnected"
        outcome.response_json = builder.response(clock).model_dump_json()
        await asyncio.shield(commit_record())
        raise
    return await writer.done()


async def _choices(
    state: AppState, prepared: PreparedRequest, clock: GenerationClock
) -> AsyncIterator[tuple[int, Step]]:
    """All choices' steps as they come, tagged with the choice index."""
    runs = [
        state.scheduler.run(sequence, stops=prepared.stops, clock=clock)
        for sequence in prepared.sequences
    ]
    if len(runs) == 1:
        async with contextlib.aclosing(runs[0]) as only:
            async for step in only:
                yield 0, step
        return
    queue: asyncio.Queue[tuple[int, Step] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, run: AsyncGenerator[Step, None]) -> None:
        try:
            async for step in run:
                queue.put_nowait((index, step))
            queue.put_nowait(None)
        except BaseException as exc:
            queue.put_nowait(exc)
            raise
        finally:
            await run.aclose()

    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    pending = len(tasks)
    try:
        while pending:
            item = await queue.get()
            if item is None:
                pending -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _finish_log(
    state: AppState, endpoint: str, request_id: str, clock: GenerationClock, outcome: _Outcome
) -> None:
    observe_request(
        endpoint=endpoint,
        model=state.manifest.name,
        status=outcome.status,
        ttft=clock.ttft,
        tps=clock.tps,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=clock.completion_tokens,
    )
    log.info(
        "request",
        request_id=request_id,
        endpoint=endpoint,
        status=outcome.status,
        error=outcome.error,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=clock.completion_tokens,
        ttft=clock.ttft,
        tps=clock.tps,
    )
