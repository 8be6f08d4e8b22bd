"""Native inference, POST /infer and /pipelines/{name}: pandas-records in and out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid

from aiohttp import web

from edge_agent.engine.scheduler import GenerationClock
from edge_agent.engine.types import BackendError
from edge_agent.errors import ApiError, InvalidRequest, NotFound, OpenAIEnabled
from edge_agent.observability import observe_request
from edge_agent.protocol import CompletionRequest
from edge_agent.server.engine_errors import api_error_for
from edge_agent.server.openai_requests import prepare
from edge_agent.server.records import build_record, request_body_for_log
from edge_agent.server.state import AppState, state_of


async def pipeline_infer(request: web.Request) -> web.Response:
    state = state_of(request)
    if request.match_info["pipeline"] != state.settings.pipeline:
        raise NotFound(f"no pipeline named {request.match_info['pipeline']!r}")
    return await infer(request)


async def infer(request: web.Request) -> web.Response:
    state = state_of(request)
    clock = GenerationClock()
    accepted_ms = int(time.time() * 1000)
    raw = await request.read()
    status, error, body_out, prompt_tokens = "ok", None, None, 0
    try:
        if state.manifest.openai.enabled:
            raise OpenAIEnabled()
        texts = _texts(raw)
        state.require_ready()
        outputs = []
        for text in texts:
            started = time.perf_counter_ns()
            generated, used = await _generate(state, text, clock)
            prompt_tokens += used
            outputs.append(
                {
                    "time": int(time.time() * 1000),
                    "in": {"text": text},
                    "out": {"generated_text": generated},
                    "anomaly": {"count": 0},
                    "metadata": {
                        "last_model": json.dumps(
                            {"model_name": state.manifest.name, "model_sha": state.manifest.sha256}
                        ),
                        "pipeline_version": state.manifest.version,
                        "elapsed": [time.perf_counter_ns() - started],
                        "dropped": [],
                        "partition": socket.gethostname(),
                    },
                }
            )
        body_out = json.dumps(outputs)
        return web.Response(text=body_out, content_type="application/json")
    except ApiError as exc:
        status, error = "error", exc.message
        raise
    except BackendError as exc:
        status, error = "error", str(exc)
        raise api_error_for(exc) from None
    except asyncio.CancelledError:
        status, error = "cancelled", "client disconnected"
        raise
    finally:
        record = build_record(
            state,
            endpoint="infer",
            accepted_ms=accepted_ms,
            body=request_body_for_log(raw),
            response_json=body_out,
            params=state.manifest.openai.completion_config,
            clock=clock,
            prompt_tokens=prompt_tokens,
            status=status,
            error=error,
        )
        await asyncio.shield(state.records.append(record))
        observe_request(
            endpoint="infer",
            model=state.manifest.name,
            status=status,
            ttft=clock.ttft,
            tps=clock.tps,
            prompt_tokens=prompt_tokens,
            completion_tokens=clock.completion_tokens,
        )


def _texts(raw: bytes) -> list[str]:
    try:
        records = json.loads(raw)
    except ValueError:
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(records, list) or not records:
        raise InvalidRequest('body must be pandas-records JSON: [{"text": "..."}, ...]')
    texts = []
    for index, record in enumerate(records):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text:
            raise InvalidRequest(f"record {index}: needs a non-empty string 'text'", param="text")
        texts.append(record["text"])
    return texts


async def _generate(state: AppState, text: str, clock: GenerationClock) -> tuple[str, int]:
    prepared = await prepare(
        "completions",
        CompletionRequest(prompt=text),
        request_id=uuid.uuid4().hex,
        backend=state.backend,
        defaults=state.manifest.openai.completion_config,
    )
    pieces: list[str] = []
    with state.scheduler.admit(1):
        run = state.scheduler.run(prepared.sequences[0], stops=prepared.stops, clock=clock)
        async with contextlib.aclosing(run) as steps:
            async for step in steps:
                pieces.append(step.text)
    return "".join(pieces), prepared.prompt_tokens
