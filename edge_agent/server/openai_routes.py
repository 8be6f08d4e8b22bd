"""POST /infer/openai/v1/completions and /chat/completions, streamed or not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import structlog
from aiohttp import web

from edge_agent.engine.errors import EngineError
from edge_agent.engine.scheduler import GenerationClock, Step
from edge_agent.errors import ApiError, OpenAIDisabled
from edge_agent.protocol.edge import OPENAI_PREFIX
from edge_agent.protocol.openai import ModelCard, ModelList
from edge_agent.server.body import read_body, require_json
from edge_agent.server.openai_requests import Endpoint, PreparedRequest, parse_request, prepare
from edge_agent.server.openai_responses import ResponseBuilder, response_builder
from edge_agent.server.params import model_defaults
from edge_agent.server.records import RequestLedger
from edge_agent.server.sse import ClientStalled, SseWriter, keep_alive
from edge_agent.server.state import AppState, ServedModel, state_of
from edge_agent.server.wire import json_response

log = structlog.get_logger(__name__)

PREFIX = OPENAI_PREFIX


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completions")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat/completions")


async def list_models(request: web.Request) -> web.Response:
    state = state_of(request)
    manifest = state.manifest
    if not manifest.openai.enabled:
        raise OpenAIDisabled()
    served = [manifest.name]
    if manifest.embedding.enabled and manifest.embedding.name is not None:
        served.append(manifest.embedding.name)  # a separate embedding model
    cards = [ModelCard(id=name, created=int(state.started_at)) for name in served]
    return json_response(ModelList(data=cards))


async def _serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = state_of(request)
    ledger = RequestLedger(state, endpoint, b"")
    async with ledger.guard():
        # Read inside the guard: a body that never arrives whole is recorded too.
        ledger.raw = await read_body(request)
        require_json(request)
        served = ledger.served
        if not served.manifest.openai.enabled:
            raise OpenAIDisabled()
        parsed = parse_request(endpoint, ledger.raw)
        state.require_ready(served)
        prepared = await prepare(
            endpoint,
            parsed,
            request_id=ledger.request_id,
            backend=served.backend,
            defaults=model_defaults(served.manifest, endpoint),
        )
        ledger.params = prepared.params.for_log()
        ledger.prompt_tokens = prepared.prompt_tokens
        with served.scheduler.admit(len(prepared.sequences)):
            builder = response_builder(prepared, served.manifest.name, served.backend)
            ledger.partial_response = lambda: builder.response(ledger.clock).model_dump_json()
            if prepared.stream:
                return await _stream(request, state, prepared, builder, ledger)
            return await _respond(prepared, builder, ledger)


async def _respond(
    prepared: PreparedRequest, builder: ResponseBuilder, ledger: RequestLedger
) -> web.Response:
    async for index, step in _choices(ledger.served, prepared, ledger.clock):
        builder.add(index, step)
    response = json_response(builder.response(ledger.clock))
    ledger.response_json = response.text
    await ledger.commit()
    return response


async def _stream(
    request: web.Request,
    state: AppState,
    prepared: PreparedRequest,
    builder: ResponseBuilder,
    ledger: RequestLedger,
) -> web.StreamResponse:
    http = state.settings.http
    writer = SseWriter(request, stall_s=http.stream_stall_s, buffer_bytes=http.write_buffer_bytes)
    try:
        await writer.start()
        try:
            await _stream_steps(state, prepared, builder, ledger, writer)
        except (ApiError, EngineError) as error:
            # The status line is gone: the failure travels as an event, then [DONE].
            await writer.send((await ledger.fail(error)).envelope())
        return await writer.done()
    except ClientStalled as stalled:
        # Recorded before the connection drops: dropping it cancels this handler.
        await ledger.end_cancelled(str(stalled))
        writer.abort()
        return writer.response


async def _stream_steps(
    state: AppState,
    prepared: PreparedRequest,
    builder: ResponseBuilder,
    ledger: RequestLedger,
    writer: SseWriter,
) -> None:
    clock = ledger.clock
    for opening in builder.opening_chunks():
        await writer.send(opening)
    remaining = len(prepared.sequences)
    choices = keep_alive(
        _choices(ledger.served, prepared, clock), writer, state.settings.sse_ping_s
    )
    # Closed on the way out, so a stalled or failed stream stops generating at once.
    async with contextlib.aclosing(choices) as steps:
        async for index, step in steps:
            builder.add(index, step)
            if step.finish_reason is None or remaining > 1:
                remaining -= step.finish_reason is not None
                for chunk in builder.step_chunks(index, step):
                    await writer.send(chunk)
                continue
            # The last choice finished: the record is durable before its chunk leaves.
            usage = builder.usage(clock)
            ledger.response_json = builder.response(clock).model_dump_json()
            await ledger.commit()
            if prepared.include_usage:
                for chunk in builder.step_chunks(index, step):
                    await writer.send(chunk)
                await writer.send(builder.usage_chunk(usage))
            else:
                for chunk in builder.step_chunks(index, step, usage):
                    await writer.send(chunk)


async def _choices(
    served: ServedModel, prepared: PreparedRequest, clock: GenerationClock
) -> AsyncGenerator[tuple[int, Step], None]:
    """All choices' steps as they come, tagged with the choice index."""
    runs = [
        served.scheduler.run(sequence, stops=prepared.stops, clock=clock)
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
