"""The backend protocol: what the engine asks of llama.cpp or vLLM, and what comes back.

A backend turns prompt token ids plus sampling parameters into a stream of
``TokenEvent``. It knows nothing of HTTP, SSE or OpenAI JSON; stop strings,
timing and response shapes live above it so every backend behaves the same.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

# What a backend raises is part of its protocol; the classes live with the engine's others.
from edge_agent.engine.errors import BackendError as BackendError
from edge_agent.engine.errors import EngineRestarted as EngineRestarted
from edge_agent.engine.errors import EngineUnavailable as EngineUnavailable
from edge_agent.engine.errors import UnsupportedFeature as UnsupportedFeature

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the generated text: any JSON object, or JSON matching a schema.

    ``prefix`` and ``suffix`` wrap the JSON in fixed text (a template's tool-call markup,
    ``<tool_call>`` ... ``</tool_call>``); ``repeat`` allows one or more wrapped values.
    """

    kind: Literal["json_object", "json_schema"]
    schema_json: str | None = None
    prefix: str = ""
    suffix: str = ""
    repeat: bool = False


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Effective sampling parameters for one sequence (request over model defaults)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    # None: no logprobs; 0: the chosen token's only; k: also the k most likely alternatives.
    logprobs: int | None = None
    structured_output: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_tokens: Sequence[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """Inputs to embed, already token ids; one vector comes back per input, in order."""

    request_id: str
    inputs: Sequence[Sequence[int]]


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """One pooled, L2-normalised vector per input, in the request's order."""

    vectors: tuple[tuple[float, ...], ...]


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token, or the bare end of a sequence.

    ``token_id`` is None only for an end that produced no token (end-of-sequence):
    that event carries ``finish_reason="stop"`` and empty text, and is not counted
    as a completion token. ``text`` may be empty while a multi-byte character is
    still incomplete; its bytes arrive with a later token.
    """

    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model made: ``arguments`` is its JSON text, as generated."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call; ``parameters`` is a JSON schema (a parsed object)."""

    name: str
    description: str | None = None
    parameters: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation: an assistant's may hold tool calls, a tool's answers one."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


# How a chat template has its model write tool calls (engine/tool_calls.py parses them):
# Hermes/Qwen ``<tool_call>{json}</tool_call>``, Llama 3 ``{"name":..,"parameters":..}``,
# Mistral ``[TOOL_CALLS][{..}]``, or ``generic`` for a template that knows no tools.
ToolCallFormat = Literal["hermes", "llama3", "mistral", "generic"]


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: Literal["llamacpp", "vllm"]
    context_length: int  # tokens per sequence
    parallel: int  # sequences decoded together
    vocab_size: int = 0
    detail: str = ""
    # llama.cpp: the CPU configuration serving and why (which probes passed or failed).
    configuration: str | None = None
    configuration_reason: str | None = None
    restarts: int = 0  # engine processes restarted after dying
    engine_pid: int | None = None  # the engine process, where it runs in one of its own
    cpu_features: tuple[str, ...] = ()  # what the build uses on this CPU (AVX2, AVX512...)
    # Embeddings: the vector length (0 where the backend serves none) and the most
    # tokens one input may have.
    embedding_length: int = 0
    embedding_max_tokens: int = 0


@runtime_checkable
class Backend(Protocol):
    """What the scheduler needs of an inference backend."""

    @property
    def info(self) -> BackendInfo: ...

    @property
    def unavailable(self) -> str | None:
        """Why the backend cannot take requests right now (its engine restarting), or None."""

    async def start(self) -> None:
        """Load the model. Long-running; the server already listens meanwhile."""

    async def close(self) -> None:
        """Stop generating and release the model."""

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids for text; ``add_special`` adds BOS/EOS as the model wants,
        ``parse_special`` reads special tokens spelled as text (rendered chat templates)."""

    def detokenize(self, token_ids: Sequence[int]) -> str: ...

    @property
    def tool_call_format(self) -> ToolCallFormat | None:
        """How the model writes tool calls, or None where this backend cannot offer tools."""

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        add_generation_prompt: bool = True,
    ) -> str:
        """Apply the model's own chat template, by default ending with the assistant's turn
        opened; ``tools`` are offered to the model as its template (or format) says."""

    def tokenize_for_embedding(self, text: str) -> list[int]:
        """Token ids of an embedding input, in the vocabulary of the model that embeds it."""

    def check_supported(self, params: SamplingParams) -> None:
        """Raise UnsupportedFeature for anything this backend cannot honour."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Stream the sequence's tokens; the last event carries ``finish_reason``.

        Closing the iterator early (``aclose``) cancels the sequence: its slot is
        free again within one decode step.
        """

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """One vector per input (pooled as the model says, L2-normalised).

        Raises UnsupportedFeature (``embeddings``) where the backend serves none, and
        (``embedding_input``) for an input it cannot take (too long, a token id outside
        the vocabulary).
        """


@runtime_checkable
class LoadsInBackground(Protocol):
    """A backend that can load beside a serving one without taking its cores."""

    def load_in_background(self) -> None:
        """Have ``start`` load at the lowest CPU priority."""

    def to_foreground(self) -> str | None:
        """Serve at the daemon's own priority from now on; why not, when refused."""
