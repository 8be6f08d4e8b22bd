"""POST /tokenize and /detokenize: the deployed model's own tokenizer and chat template.

Tokenizing is not inference: it takes no generation slot and leaves no inference record.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import pydantic_core
from aiohttp import web
from pydantic import BaseModel

from edge_agent.engine.types import Backend, ToolSpec, UnsupportedFeature
from edge_agent.errors import InvalidRequest
from edge_agent.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizePromptRequest,
    TokenizeResponse,
)
from edge_agent.server.body import read_body, require_json
from edge_agent.server.engine_errors import as_api_error
from edge_agent.server.openai_requests import parse_body
from edge_agent.server.openai_tools import chat_messages
from edge_agent.server.state import state_of
from edge_agent.server.wire import json_response


async def tokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    raw = await read_body(request)
    require_json(request)
    # The body's shape picks the model, so an error names the field as the client wrote it.
    body = _loads(raw)
    parsed: TokenizeChatRequest | TokenizePromptRequest
    if isinstance(body, dict) and "messages" in body:
        parsed, param = _parse(TokenizeChatRequest, raw), "messages"
    else:
        parsed, param = _parse(TokenizePromptRequest, raw), "prompt"
    with state.serving() as served:
        state.require_ready(served)
        backend = served.backend
        try:
            tokens, strs = await asyncio.to_thread(_tokenize, parsed, backend)
        except UnsupportedFeature as exc:
            raise as_api_error(exc, prompt_param=param) from None
    return json_response(
        TokenizeResponse(
            count=len(tokens),
            max_model_len=backend.info.context_length,
            tokens=tokens,
            token_strs=strs,
        )
    )


async def detokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    raw = await read_body(request)
    require_json(request)
    parsed = _parse(DetokenizeRequest, raw)
    with state.serving() as served:
        state.require_ready(served)
        try:
            text = await asyncio.to_thread(served.backend.detokenize, parsed.tokens)
        except UnsupportedFeature as exc:
            raise as_api_error(exc, prompt_param="tokens") from None
    return json_response(DetokenizeResponse(prompt=text))


def _loads(raw: bytes) -> object:
    try:
        return pydantic_core.from_json(raw)
    except ValueError:
        return None  # the model's own parse says what is wrong with it


Body = TypeVar("Body", bound=BaseModel)


def _parse(model: type[Body], raw: bytes) -> Body:
    return parse_body(model, raw)


def _tokenize(
    request: TokenizeChatRequest | TokenizePromptRequest, backend: Backend
) -> tuple[list[int], list[str] | None]:
    if isinstance(request, TokenizePromptRequest):
        text = request.prompt
        tokens = backend.tokenize(text, add_special=request.add_special_tokens, parse_special=False)
    else:
        tools = tuple(
            ToolSpec(t.function.name, t.function.description, t.function.parameters or {})
            for t in request.tools or ()
        )
        if tools and backend.tool_call_format is None:
            raise InvalidRequest(
                "tools: tool calling is not supported by this backend", param="tools"
            )
        text = backend.render_chat(
            chat_messages(request.messages),
            tools=tools,
            add_generation_prompt=request.add_generation_prompt,
        )
        tokens = backend.tokenize(text, add_special=request.add_special_tokens, parse_special=True)
    strs = [backend.detokenize([t]) for t in tokens] if request.return_token_strs else None
    return tokens, strs
