"""From a validated OpenAI request to engine work: prompts, token ids, one sequence per choice."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from edge_agent.engine.types import (
    Backend,
    GenerationRequest,
    UnsupportedFeature,
)
from edge_agent.errors import ContextLengthExceeded, InvalidRequest
from edge_agent.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from edge_agent.server.engine_errors import as_api_error
from edge_agent.server.openai_tools import ToolUse, chat_messages, tool_use
from edge_agent.server.params import EffectiveParams, effective_params
from edge_agent.server.strict_json import StrictJsonError, loads_strict

Endpoint = Literal["completions", "chat/completions"]


@dataclass
class PreparedRequest:
    """Everything the response writer and the inference log need about one request."""

    endpoint: Endpoint
    request_id: str
    params: EffectiveParams
    sequences: list[GenerationRequest]  # one per choice
    prompt_texts: list[str]  # per choice, for echo
    prompt_tokens: int
    stops: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool
    tools: ToolUse | None = None  # chat with tools: replies are read for tool calls
    # The parameters as the client gave them, for the response's request_params.
    user_params: dict[str, Any] = field(default_factory=dict)


def parse_request(endpoint: Endpoint, raw: bytes) -> CompletionRequest | ChatCompletionRequest:
    if endpoint == "completions":
        return parse_body(CompletionRequest, raw)
    return parse_body(ChatCompletionRequest, raw)


Body = TypeVar("Body", bound=BaseModel)


def parse_body(model: type[Body], raw: bytes) -> Body:
    """A JSON body as ``model``: what JSON parsers let through refused first, then the
    model's own validation, each failure the 400 that names the field."""
    try:
        loads_strict(raw)
    except StrictJsonError as exc:
        raise InvalidRequest(str(exc)) from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise as_invalid_request(exc) from None


def as_invalid_request(exc: ValidationError) -> InvalidRequest:
    """A validation failure as the 400 a client gets: the first error, naming its field."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return InvalidRequest(f"request body is not valid JSON: {first['msg']}")
    if first["type"] == "model_type":
        return InvalidRequest("request body must be a JSON object")
    param = ""
    in_union_member = False
    for part in first["loc"]:
        if param in _USER_KEYED_FIELDS:
            break  # what follows is the client's own key (a token id), not a field
        if isinstance(part, str) and _is_union_tag(part):
            # Pydantic names the union member it tried: the field path ends before it.
            in_union_member = True
            break
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else part)
    message = first["msg"]
    if first["type"] == "missing":
        message = "field required"
    elif in_union_member:
        message = f"not a valid value ({message.lower()})"
    return InvalidRequest(f"{param}: {message}" if param else message, param=param or None)


_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})
_USER_KEYED_FIELDS = frozenset({"logit_bias"})


def _is_union_tag(part: str) -> bool:
    """Pydantic's names for union members: str, list[int], constrained-str, TextFormat..."""
    return part in _SCALAR_TAGS or "[" in part or "-" in part or part[:1].isupper()


def _refuse_unsupported(request: CompletionRequest | ChatCompletionRequest) -> None:
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest(
            "stream_options: only allowed when stream is true", param="stream_options"
        )
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise InvalidRequest("suffix: not supported by this model", param="suffix")
        if request.best_of not in (None, 1, request.n or 1):
            raise InvalidRequest("best_of: only best_of equal to n is supported", param="best_of")
    elif request.functions:
        raise InvalidRequest(
            "functions: the deprecated functions API is not supported; use tools",
            param="functions",
        )


async def prepare(
    endpoint: Endpoint,
    request: CompletionRequest | ChatCompletionRequest,
    *,
    request_id: str,
    backend: Backend,
    defaults: SamplingFields,
) -> PreparedRequest:
    _refuse_unsupported(request)
    params = effective_params(request, defaults)
    tools = tool_use(request, backend) if isinstance(request, ChatCompletionRequest) else None
    explicit_max = "max_tokens" in request.model_fields_set or (
        isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None
    )
    try:
        prompts = await asyncio.to_thread(_prompts_as_tokens, request, backend, tools)
    except UnsupportedFeature as exc:
        raise as_api_error(exc, prompt_param=_prompt_param(request)) from None
    info = backend.info
    window = info.context_length
    logprobs = _logprobs_wanted(request)
    sequences: list[GenerationRequest] = []
    prompt_texts: list[str] = []
    total_prompt = 0
    for prompt_index, (text, tokens) in enumerate(prompts):
        if not tokens:
            raise InvalidRequest("prompt: must not be empty", param=_prompt_param(request))
        room = window - len(tokens)
        wanted = params.max_tokens or room
        if room <= 0 or (explicit_max and wanted > room):
            raise ContextLengthExceeded(
                f"this model's context window is {window} tokens; the prompt has "
                f"{len(tokens)} and max_tokens asks for {wanted if explicit_max else 0} more",
                param="max_tokens" if room > 0 else _prompt_param(request),
                n_prompt_tokens=len(tokens),
                n_ctx=window,
            )
        max_tokens = min(wanted, room)
        total_prompt += len(tokens)
        for choice in range(params.n):
            sampling = params.sampling(max_tokens=max_tokens, logprobs=logprobs, choice=choice)
            if tools is not None and tools.forced is not None:
                sampling = dataclasses.replace(sampling, structured_output=tools.forced)
            try:
                backend.check_supported(sampling)
            except UnsupportedFeature as exc:
                forced = tools is not None and tools.forced is not None
                if forced and exc.feature == "structured_output":
                    # The grammar came from the tools' schemas, not from response_format.
                    exc = UnsupportedFeature("tools", exc.message)
                raise as_api_error(exc, prompt_param=_prompt_param(request)) from None
            sequences.append(
                GenerationRequest(f"{request_id}-{prompt_index}-{choice}", tokens, sampling)
            )
            prompt_texts.append(text)
    return PreparedRequest(
        endpoint=endpoint,
        request_id=request_id,
        params=params,
        sequences=sequences,
        prompt_texts=prompt_texts,
        prompt_tokens=total_prompt,
        stops=params.stop,
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        logprobs=logprobs,
        echo=bool(getattr(request, "echo", False)),
        tools=tools,
        user_params=request.model_dump(
            mode="json", by_alias=True, exclude_unset=True, exclude={"prompt", "messages"}
        ),
    )


def _prompt_param(request: CompletionRequest | ChatCompletionRequest) -> str:
    return "prompt" if isinstance(request, CompletionRequest) else "messages"


def _logprobs_wanted(request: CompletionRequest | ChatCompletionRequest) -> int | None:
    if isinstance(request, CompletionRequest):
        return request.logprobs
    if request.logprobs:
        return request.top_logprobs or 0
    if request.top_logprobs:
        raise InvalidRequest("top_logprobs: requires logprobs to be true", param="top_logprobs")
    return None


def _prompts_as_tokens(
    request: CompletionRequest | ChatCompletionRequest, backend: Backend, tools: ToolUse | None
) -> list[tuple[str, list[int]]]:
    if isinstance(request, ChatCompletionRequest):
        messages = chat_messages(request.messages)
        text = backend.render_chat(messages, tools=tools.tools if tools else ())
        return [(text, backend.tokenize(text, add_special=False, parse_special=True))]
    prompt = request.prompt
    if isinstance(prompt, str):
        return [(prompt, backend.tokenize(prompt, add_special=True, parse_special=False))]
    if all(isinstance(p, int) for p in prompt):
        ids = [int(p) for p in prompt]  # type: ignore[arg-type]
        return [(backend.detokenize(ids), ids)]
    out: list[tuple[str, list[int]]] = []
    for item in prompt:
        if isinstance(item, str):
            out.append((item, backend.tokenize(item, add_special=True, parse_special=False)))
        else:
            ids = list(item)  # type: ignore[arg-type]
            out.append((backend.detokenize(ids), ids))
    return out
