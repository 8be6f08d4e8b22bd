"""Native inference, POST /infer and /pipelines/{name}: pandas-records in and out."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid

from aiohttp import web
from pydantic import ValidationError

from edge_agent.errors import InvalidRequest, NotFound, OpenAIEnabled
from edge_agent.protocol.native import (
    NativeAnomaly,
    NativeIn,
    NativeMetadata,
    NativeOut,
    NativeOutput,
    NativeOutputs,
    NativeRecords,
)
from edge_agent.protocol.openai import CompletionRequest
from edge_agent.server.body import read_body, require_json
from edge_agent.server.openai_requests import prepare
from edge_agent.server.params import model_defaults
from edge_agent.server.records import RequestLedger
from edge_agent.server.state import state_of
from edge_agent.server.strict_json import StrictJsonError, loads_strict
from edge_agent.server.wire import json_response


async def pipeline_infer(request: web.Request) -> web.Response:
    state = state_of(request)
    if request.match_info["pipeline"] != state.settings.pipeline:
        raise NotFound(f"no pipeline named {request.match_info['pipeline']!r}")
    return await infer(request)


async def infer(request: web.Request) -> web.Response:
    state = state_of(request)
    ledger = RequestLedger(state, "infer", b"")
    async with ledger.guard():
        # Read inside the guard: a body that never arrives whole is recorded too.
        ledger.raw = await read_body(request)
        require_json(request)
        if ledger.served.manifest.openai.enabled:
            raise OpenAIEnabled()
        texts = _texts(ledger.raw)
        state.require_ready(ledger.served)
        outputs = [await _answer(text, ledger) for text in texts]
        response = json_response(NativeOutputs(outputs))
        ledger.response_json = response.text
        return response


async def _answer(text: str, ledger: RequestLedger) -> NativeOutput:
    started = time.perf_counter_ns()
    generated = await _generate(text, ledger)
    manifest = ledger.served.manifest
    metadata = NativeMetadata(
        last_model=json.dumps({"model_name": manifest.name, "model_sha": manifest.sha256}),
        pipeline_version=manifest.version,
        elapsed=[time.perf_counter_ns() - started],
        dropped=[],
        partition=socket.gethostname(),
    )
    # By wire name: "in" is a keyword, so it cannot be an argument.
    return NativeOutput.model_validate(
        {
            "time": int(time.time() * 1000),
            "in": NativeIn(text=text),
            "out": NativeOut(generated_text=generated),
            "anomaly": NativeAnomaly(count=0),
            "metadata": metadata,
        }
    )


def _texts(raw: bytes) -> list[str]:
    try:
        loads_strict(raw)
    except StrictJsonError as exc:
        raise InvalidRequest(str(exc)) from None
    try:
        records = NativeRecords.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise InvalidRequest("request body is not valid JSON") from None
        if len(first["loc"]) < 2:  # not a list, an empty one, or a row that is not an object
            raise InvalidRequest(
                'body must be pandas-records JSON: [{"text": "..."}, ...]'
            ) from None
        index = first["loc"][0]
        raise InvalidRequest(
            f"record {index}: needs a non-empty string 'text'", param="text"
        ) from None
    return [record.text for record in records.root]


async def _generate(text: str, ledger: RequestLedger) -> str:
    served = ledger.served
    prepared = await prepare(
        "completions",
        CompletionRequest(prompt=text),
        request_id=uuid.uuid4().hex,
        backend=served.backend,
        defaults=model_defaults(served.manifest, "infer"),
    )
    ledger.params = prepared.params.for_log()
    ledger.prompt_tokens += prepared.prompt_tokens
    pieces: list[str] = []
    with served.scheduler.admit(1):
        run = served.scheduler.run(prepared.sequences[0], stops=prepared.stops, clock=ledger.clock)
        async with contextlib.aclosing(run) as steps:
            async for step in steps:
                pieces.append(step.text)
    return "".join(pieces)
