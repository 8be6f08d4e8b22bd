"""Engine steps to OpenAI shapes: streaming chunks and the assembled final response.

What both surfaces share (the text so far, logprobs, usage) is ``ResponseBuilder``;
each surface's shapes are its own subclass, so neither branches on the other.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.engine.scheduler import GenerationClock, Step
from edge_agent.engine.tool_calls import CallStart, Content, Piece, ToolCallParser
from edge_agent.engine.types import Backend, FinishReason
from edge_agent.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatFinishReason,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    TopLogprobEntry,
    Usage,
)
from edge_agent.server.openai_requests import PreparedRequest

Chunk = ChatCompletionChunk | CompletionChunk
Response = ChatCompletionResponse | CompletionResponse


@dataclass
class ChoiceText:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[TopLogprobEntry]] = field(default_factory=list)


class ResponseBuilder(ABC):
    """Builds one request's chunks and final response; one instance per request."""

    id_prefix: str

    def __init__(
        self, prepared: PreparedRequest, model_name: str, token_text: Callable[[int], str]
    ) -> None:
        """``token_text``: one token's own text, for logprobs (the backend's detokenizer)."""
        self.prepared = prepared
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model_name
        self._token_text = token_text
        self.choices = [ChoiceText() for _ in prepared.sequences]
        if prepared.echo:
            for choice, prompt in zip(self.choices, prepared.prompt_texts, strict=True):
                choice.text.append(prompt)

    def add(self, index: int, step: Step) -> None:
        choice = self.choices[index]
        choice.text.append(step.text)
        if step.finish_reason is not None:
            choice.finish_reason = step.finish_reason
            choice.stop_reason = step.stop_reason
        if self._has_logprobs(step):
            assert step.token is not None and step.token.token_id is not None
            choice.tokens.append(self._token_text(step.token.token_id))
            choice.token_logprobs.append(step.token.logprob)
            choice.top_logprobs.append(
                [TopLogprobEntry(token=t.token, logprob=t.logprob) for t in step.token.top_logprobs]
            )

    def usage(self, clock: GenerationClock) -> Usage:
        completion = clock.completion_tokens
        return Usage(
            prompt_tokens=self.prepared.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prepared.prompt_tokens + completion,
            ttft=clock.ttft,
            tps=clock.tps,
        )

    def _params_beside(self, usage: Usage | None) -> dict[str, Any] | None:
        """The request's parameters go where usage goes: once, after the last token."""
        return self.prepared.user_params if usage is not None else None

    def _has_logprobs(self, step: Step) -> bool:
        token = step.token
        return (
            self.prepared.logprobs is not None and token is not None and token.token_id is not None
        )

    def _step_range(self, index: int, step: Step) -> tuple[ChoiceText, int, int] | None:
        """The logprobs entry this step added to its choice, if it added one."""
        if not self._has_logprobs(step):
            return None
        choice = self.choices[index]
        return choice, len(choice.tokens) - 1, len(choice.tokens)

    @abstractmethod
    def opening_chunks(self) -> Iterator[Chunk]:
        """What a stream sends before the first token."""

    @abstractmethod
    def step_chunk(self, index: int, step: Step, usage: Usage | None = None) -> Chunk: ...

    def step_chunks(self, index: int, step: Step, usage: Usage | None = None) -> Sequence[Chunk]:
        """What a stream sends for one step (after ``add``): nothing for a step with
        nothing to say, else its chunks, ``usage`` on the last."""
        if step.finish_reason is None and not step.text and self.prepared.logprobs is None:
            return []
        return [self.step_chunk(index, step, usage)]

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> Chunk: ...

    @abstractmethod
    def response(self, clock: GenerationClock) -> Response: ...


class CompletionResponses(ResponseBuilder):
    """``text_completion`` objects: text deltas, echo, offsets in the logprobs."""

    id_prefix = "cmpl-"

    def opening_chunks(self) -> Iterator[CompletionChunk]:
        if self.prepared.echo:
            yield self._chunk(
                [
                    CompletionChoice(index=i, text=prompt)
                    for i, prompt in enumerate(self.prepared.prompt_texts)
                ]
            )

    def step_chunk(self, index: int, step: Step, usage: Usage | None = None) -> CompletionChunk:
        span = self._step_range(index, step)
        choice = CompletionChoice(
            index=index,
            text=step.text,
            logprobs=None if span is None else self._logprobs(*span),
            finish_reason=step.finish_reason,
            stop_reason=step.stop_reason,
        )
        return self._chunk([choice], usage)

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        return self._chunk([], usage)

    def response(self, clock: GenerationClock) -> CompletionResponse:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text="".join(c.text),
                    logprobs=self._logprobs(c, 0, len(c.tokens)),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage(clock),
            request_params=self.prepared.user_params,
        )

    def _chunk(
        self, choices: list[CompletionChoice], usage: Usage | None = None
    ) -> CompletionChunk:
        return CompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            request_params=self._params_beside(usage),
        )

    def _logprobs(self, choice: ChoiceText, start: int, end: int) -> CompletionLogprobs | None:
        if self.prepared.logprobs is None:
            return None
        offsets: list[int] = []
        position = len("".join(choice.text[:1])) if self.prepared.echo else 0
        for i in range(end):
            if i >= start:
                offsets.append(position)
            position += len(choice.tokens[i])
        return CompletionLogprobs(
            tokens=choice.tokens[start:end],
            token_logprobs=choice.token_logprobs[start:end],
            top_logprobs=[
                {entry.token: entry.logprob for entry in entries} or None
                for entries in choice.top_logprobs[start:end]
            ],
            text_offset=offsets,
        )


class ChatResponses(ResponseBuilder):
    """``chat.completion`` objects: the assistant's role first, then content deltas.

    With tools, each choice's text goes through a ``ToolCallParser``: content deltas carry
    only what cannot be call markup; a call's ``id`` and ``function.name`` go out in one
    delta as soon as the name is complete, its arguments in fragments as they come.
    """

    id_prefix = "chatcmpl-"

    def __init__(
        self, prepared: PreparedRequest, model_name: str, token_text: Callable[[int], str]
    ) -> None:
        super().__init__(prepared, model_name, token_text)
        tools = prepared.tools
        self._parsers = [
            ToolCallParser(tools.format, tools.names, parallel=tools.parallel) if tools else None
            for _ in self.choices
        ]
        self._content: list[list[str]] = [[] for _ in self.choices]
        self._pending: list[list[Piece]] = [[] for _ in self.choices]

    def add(self, index: int, step: Step) -> None:
        super().add(index, step)
        parser = self._parsers[index]
        if parser is None:
            return
        pieces = parser.feed(step.text)
        if step.finish_reason is not None:
            pieces += parser.finish()
        self._content[index].extend(p.text for p in pieces if isinstance(p, Content))
        self._pending[index].extend(pieces)

    def step_chunks(self, index: int, step: Step, usage: Usage | None = None) -> Sequence[Chunk]:
        if self._parsers[index] is None:
            return super().step_chunks(index, step, usage)
        pieces, self._pending[index] = self._pending[index], []
        span = self._step_range(index, step)
        logprobs = None if span is None else self._logprobs(*span)
        deltas = [delta for piece in pieces for delta in _piece_deltas(piece)]
        if not deltas and logprobs is not None:
            deltas = [ChatDelta(content="")]
        choices = [ChatChunkChoice(index=index, delta=delta) for delta in deltas]
        if choices:
            choices[0].logprobs = logprobs
        if step.finish_reason is not None:
            choices.append(
                ChatChunkChoice(
                    index=index, delta=ChatDelta(), finish_reason=self._finish_reason(index)
                )
            )
        chunks = [self._chunk([choice]) for choice in choices]
        if chunks:
            chunks[-1].usage = usage
        return chunks

    def _finish_reason(self, index: int) -> ChatFinishReason | None:
        reason = self.choices[index].finish_reason
        parser = self._parsers[index]
        if reason == "stop" and parser is not None and parser.calls:
            return "tool_calls"
        return reason

    def _message(self, index: int) -> AssistantMessage:
        choice, parser = self.choices[index], self._parsers[index]
        if parser is None:
            return AssistantMessage(content="".join(choice.text))
        content = "".join(self._content[index])
        calls = [
            ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
            for call in parser.calls
        ]
        # OpenAI's convention: a reply that is only calls has null content.
        return AssistantMessage(
            content=None if calls and not content.strip() else content, tool_calls=calls
        )

    def opening_chunks(self) -> Iterator[ChatCompletionChunk]:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        yield self._chunk(
            [
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                for i in range(len(self.choices))
            ]
        )

    def step_chunk(self, index: int, step: Step, usage: Usage | None = None) -> ChatCompletionChunk:
        span = self._step_range(index, step)
        content = step.text if step.text or step.finish_reason is None else None
        choice = ChatChunkChoice(
            index=index,
            delta=ChatDelta(content=content),
            logprobs=None if span is None else self._logprobs(*span),
            finish_reason=step.finish_reason,
        )
        return self._chunk([choice], usage)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def response(self, clock: GenerationClock) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=self._message(i),
                    logprobs=self._logprobs(c, 0, len(c.tokens)),
                    finish_reason=self._finish_reason(i),
                )
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage(clock),
            request_params=self.prepared.user_params,
        )

    def _chunk(
        self, choices: list[ChatChunkChoice], usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            request_params=self._params_beside(usage),
        )

    def _logprobs(self, choice: ChoiceText, start: int, end: int) -> ChatLogprobs | None:
        if self.prepared.logprobs is None:
            return None
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    token=choice.tokens[i],
                    logprob=choice.token_logprobs[i] or 0.0,
                    bytes=list(choice.tokens[i].encode()),
                    top_logprobs=choice.top_logprobs[i],
                )
                for i in range(start, end)
            ]
        )


def _piece_deltas(piece: Piece) -> list[ChatDelta]:
    if isinstance(piece, Content):
        return [ChatDelta(content=piece.text)]
    if isinstance(piece, CallStart):
        function = FunctionCallDelta(name=piece.name, arguments="")
        call = ToolCallDelta(index=piece.index, id=piece.id, type="function", function=function)
    else:
        call = ToolCallDelta(index=piece.index, function=FunctionCallDelta(arguments=piece.text))
    return [ChatDelta(tool_calls=[call])]


def response_builder(
    prepared: PreparedRequest, model_name: str, backend: Backend
) -> ResponseBuilder:
    """The builder for the request's surface."""
    surface = ChatResponses if prepared.endpoint == "chat/completions" else CompletionResponses
    return surface(prepared, model_name, lambda token: backend.detokenize([token]))
