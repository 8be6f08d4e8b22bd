"""The OpenAI surface: requests, responses, stream chunks, the error envelope (CONTRACT.md 2-4).

Requests validate strictly (a string is not a number) but accept unknown fields,
as vLLM does; those are ignored for generation and kept in the inference log.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields that shape generation; the model's configured defaults may set any of them.
SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "n",
    "response_format",
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(_Request):
    type: Literal["text"]


class JsonObjectFormat(_Request):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


# Constraints live in the types, not in validators, so the OpenAPI document generated
# from these models refuses exactly what the server refuses.
ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]
NonEmptyText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[int], Field(min_length=1)]
StopSequences = NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=16)]
TokenIdKey = Annotated[str, Field(pattern=r"^-?\d+$")]
Bias = Annotated[float, Field(ge=-100, le=100)]
Prompt = (
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class SamplingFields(_Request):
    """What completions and chat share; also the shape of a model's configured defaults."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    stop: StopSequences | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    logit_bias: dict[TokenIdKey, Bias] | None = Field(
        default=None,
        # Pydantic validates the key pattern but does not put it in the JSON schema.
        json_schema_extra={"propertyNames": {"pattern": r"^-?\d+$"}},
    )
    n: int | None = Field(default=None, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    def extra_fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=16)


class TextPart(_Request):
    type: Literal["text"]
    text: str


# OpenAI's rule for function names; also what keeps them safe inside a GBNF grammar.
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="a JSON schema of the arguments object"
    )
    strict: bool | None = None


class FunctionTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallRequest(_Request):
    name: str
    arguments: str


class MessageToolCall(_Request):
    """A call an earlier assistant turn made, sent back in the history."""

    id: str
    type: Literal["function"]
    function: FunctionCallRequest


class Message(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[MessageToolCall] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None


# --- responses ------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    ttft: float | None = Field(description="seconds from acceptance to the first token")
    tps: float | None = Field(description="completion tokens per second, acceptance to last")


# The product doc: "the response metadata includes ttft, tps and user-specified OpenAI
# request params after the last chunk". ttft and tps ride in usage; the parameters ride
# beside it, wherever usage is, under this one extension field (SDKs keep unknown fields).
REQUEST_PARAMS_DESCRIPTION = (
    "the request's parameters as the client gave them (everything but the prompt or "
    "messages); set where usage is: the non-stream body and the stream's usage chunk"
)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    request_params: dict[str, Any] | None = Field(
        default=None, description=REQUEST_PARAMS_DESCRIPTION
    )


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object's text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the answer is only tool calls")
    tool_calls: list[ToolCall] = Field(default_factory=list)


ChatFinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    delta: None = None
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    request_params: dict[str, Any] | None = Field(
        default=None, description=REQUEST_PARAMS_DESCRIPTION
    )


class FunctionCallDelta(BaseModel):
    name: str | None = Field(default=None, exclude_if=lambda v: v is None)
    arguments: str = Field(description="the next fragment of the arguments' JSON text")


class ToolCallDelta(BaseModel):
    """One call's part in a chunk: the first carries id and name, later ones arguments."""

    index: int
    id: str | None = Field(default=None, exclude_if=lambda v: v is None)
    type: Literal["function"] | None = Field(default=None, exclude_if=lambda v: v is None)
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    # Left out of chunks without calls, so a plain stream's deltas stay as they were.
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    message: None = None
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    request_params: dict[str, Any] | None = Field(
        default=None, description=REQUEST_PARAMS_DESCRIPTION
    )


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    request_params: dict[str, Any] | None = Field(
        default=None, description=REQUEST_PARAMS_DESCRIPTION
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edge-agent"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    param: str | None = None
    code: str | None = None
    # With code context_length_exceeded only: the numbers behind it, for clients that trim.
    n_prompt_tokens: int | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="context_length_exceeded: the prompt's length in tokens",
    )
    n_ctx: int | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="context_length_exceeded: the context window, tokens per sequence",
    )


class ErrorResponse(BaseModel):
    """The OpenAI error envelope every 4xx and 5xx answer carries (CONTRACT.md section 4)."""

    error: ErrorDetail
