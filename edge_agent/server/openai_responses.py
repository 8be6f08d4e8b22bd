"""Engine steps to OpenAI shapes: streaming chunks and the assembled final response."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from edge_agent.engine.scheduler import GenerationClock, Step
from edge_agent.engine.types import Backend, FinishReason
from edge_agent.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
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


class ResponseBuilder:
    """Builds one request's chunks and final response; one instance per request."""

    def __init__(self, prepared: PreparedRequest, model_name: str, backend: Backend) -> None:
        self.prepared = prepared
        self.chat = prepared.endpoint == "chat/completions"
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        self.id = prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model_name
        self._backend = backend
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
        token = step.token
        if self.prepared.logprobs is not None and token is not None and token.token_id is not None:
            choice.tokens.append(self._backend.detokenize([token.token_id]))
            choice.token_logprobs.append(token.logprob)
            choice.top_logprobs.append(
                [TopLogprobEntry(token=t.token, logprob=t.logprob) for t in token.top_logprobs]
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

    # --- streaming ---------------------------------------------------------------------

    def opening_chunk(self) -> Chunk | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return None
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                for i in range(len(self.choices))
            ],
        )

    def echo_chunk(self) -> Chunk | None:
        if self.chat or not self.prepared.echo:
            return None
        return CompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(index=i, text=prompt)
                for i, prompt in enumerate(self.prepared.prompt_texts)
            ],
        )

    def step_chunk(self, index: int, step: Step, usage: Usage | None = None) -> Chunk:
        logprobs = self._step_logprobs(index, step)
        if self.chat:
            content = step.text if step.text or step.finish_reason is None else None
            return ChatCompletionChunk(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[
                    ChatChunkChoice(
                        index=index,
                        delta=ChatDelta(content=content),
                        logprobs=logprobs,  # type: ignore[arg-type]
                        finish_reason=step.finish_reason,
                    )
                ],
                usage=usage,
            )
        return CompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    index=index,
                    text=step.text,
                    logprobs=logprobs,  # type: ignore[arg-type]
                    finish_reason=step.finish_reason,
                    stop_reason=step.stop_reason,
                )
            ],
            usage=usage,
        )

    def usage_chunk(self, usage: Usage) -> Chunk:
        model = ChatCompletionChunk if self.chat else CompletionChunk
        return model(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def _step_logprobs(self, index: int, step: Step) -> ChatLogprobs | CompletionLogprobs | None:
        choice = self.choices[index]
        if self.prepared.logprobs is None or step.token is None or step.token.token_id is None:
            return None
        return self._logprobs(choice, len(choice.tokens) - 1, len(choice.tokens))

    # --- the whole response ------------------------------------------------------------

    def response(self, clock: GenerationClock) -> Response:
        usage = self.usage(clock)
        if self.chat:
            return ChatCompletionResponse(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[
                    ChatChoice(
                        index=i,
                        message=AssistantMessage(content="".join(c.text)),
                        logprobs=self._logprobs(c, 0, len(c.tokens)),  # type: ignore[arg-type]
                        finish_reason=c.finish_reason,
                    )
                    for i, c in enumerate(self.choices)
                ],
                usage=usage,
            )
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text="".join(c.text),
                    logprobs=self._logprobs(c, 0, len(c.tokens)),  # type: ignore[arg-type]
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for i, c in enumerate(self.choices)
            ],
            usage=usage,
        )

    def _logprobs(
        self, choice: ChoiceText, start: int, end: int
    ) -> ChatLogprobs | CompletionLogprobs | None:
        if self.prepared.logprobs is None:
            return None
        if self.chat:
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
