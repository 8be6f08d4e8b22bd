"""POST /infer/openai/v1/embeddings: inputs to token ids, vectors back in OpenAI's shape.

The record of an embedding request keeps the response without its vectors (each
``embedding`` empty): 256 vectors of a 576-wide model are about 1.5 MB of JSON, which
would crowd the box's log store for little an operator reads.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from aiohttp import web

from edge_agent.engine.types import Backend, BackendInfo, EmbeddingRequest
from edge_agent.errors import ContextLengthExceeded, InvalidRequest, NotFound, OpenAIDisabled
from edge_agent.protocol.embeddings import (
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingUsage,
)
from edge_agent.server.body import read_body, require_json
from edge_agent.server.openai_requests import parse_body
from edge_agent.server.records import RequestLedger
from edge_agent.server.state import state_of
from edge_agent.server.wire import json_response


async def embeddings(request: web.Request) -> web.Response:
    state = state_of(request)
    ledger = RequestLedger(state, "embeddings", b"")
    async with ledger.guard():
        # Read inside the guard: a body that never arrives whole is recorded too.
        ledger.raw = await read_body(request)
        require_json(request)
        served = ledger.served
        if not served.manifest.openai.enabled:
            raise OpenAIDisabled()
        if not served.manifest.embedding.enabled:
            raise NotFound("this model does not serve embeddings ([embedding] enabled = false)")
        parsed = _parse(ledger.raw)
        ledger.params = parsed.for_log()
        state.require_ready(served)
        info = served.backend.info
        _check_dimensions(parsed, info)
        inputs = await asyncio.to_thread(_as_tokens, parsed, served.backend)
        _check_inputs(inputs, info)
        ledger.prompt_tokens = sum(len(tokens) for tokens in inputs)
        result = await served.scheduler.embed(
            EmbeddingRequest(ledger.request_id, inputs), clock=ledger.clock
        )
        tokens = ledger.prompt_tokens
        usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        data = [
            Embedding(index=i, embedding=_encode(vector, parsed.encoding_format))
            for i, vector in enumerate(result.vectors)
        ]
        body = EmbeddingsResponse(data=data, model=served.manifest.embedding_model, usage=usage)
        response = json_response(body)
        ledger.response_json = body.model_copy(
            update={"data": [item.model_copy(update={"embedding": []}) for item in data]}
        ).model_dump_json()
        await ledger.commit()
        return response


def _parse(raw: bytes) -> EmbeddingsRequest:
    return parse_body(EmbeddingsRequest, raw)


def _check_dimensions(parsed: EmbeddingsRequest, info: BackendInfo) -> None:
    # GGUF models have one vector length; only Matryoshka-trained ones could be cut.
    if parsed.dimensions is not None and parsed.dimensions != info.embedding_length:
        raise InvalidRequest(
            f"dimensions: this model does not support other dimensions than its own "
            f"({info.embedding_length})",
            param="dimensions",
        )


def _as_tokens(parsed: EmbeddingsRequest, backend: Backend) -> list[list[int]]:
    given = parsed.input
    if isinstance(given, str):
        given = [given]
    if all(isinstance(item, int) for item in given):
        return [[int(item) for item in given]]  # type: ignore[arg-type]
    return [
        backend.tokenize_for_embedding(item) if isinstance(item, str) else list(item)  # type: ignore[arg-type]
        for item in given
    ]


def _check_inputs(inputs: list[list[int]], info: BackendInfo) -> None:
    limit = info.embedding_max_tokens
    for index, tokens in enumerate(inputs):
        if limit and len(tokens) > limit:
            raise ContextLengthExceeded(
                f"input[{index}] has {len(tokens)} tokens; this model embeds at most "
                f"{limit} per input",
                n_prompt_tokens=len(tokens),
                n_ctx=limit,
                param="input",
            )


def _encode(vector: tuple[float, ...], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # What OpenAI sends and its SDK decodes: little-endian float32, base64.
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return list(vector)
