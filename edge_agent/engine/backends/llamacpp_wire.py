"""The messages between the daemon and its llama.cpp engine process.

Pickled over a Unix socket pair (``multiprocessing.connection`` framing). The daemon
sends ``Submit``/``Cancel``/``Stop``; the engine answers ``Ready`` or ``LoadFailed`` once,
then one ``Step`` per decode step carrying every sequence's new events, so the process
boundary costs one message per step, not one per token. ``Embed`` asks for one request's
vectors, answered by one ``Embedded`` with the same key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edge_agent.engine.backends.llamacpp_engine import EngineOptions
from edge_agent.engine.types import EmbeddingRequest, GenerationRequest, TokenEvent

# Set in the engine process's environment by tests, to crash it for real (SIGSEGV) just
# before its first decode under the named configuration: "segv:repack".
FAULT_ENV = "EDGE_AGENT_ENGINE_FAULT"


@dataclass(frozen=True, slots=True)
class Start:
    options: EngineOptions
    log_format: str


@dataclass(frozen=True, slots=True)
class Submit:
    key: int
    request: GenerationRequest


@dataclass(frozen=True, slots=True)
class Cancel:
    key: int


@dataclass(frozen=True, slots=True)
class Embed:
    key: int
    request: EmbeddingRequest


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Ready:
    context_length: int  # tokens per sequence the context really has
    self_check_tokens: tuple[int, ...]
    self_check_s: float
    load_s: float
    system_info: str
    buffers: tuple[str, ...] = ()  # llama.cpp's "<type> model buffer size" lines


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """The engine could not load (a missing file, no memory): not a crash, no fallback."""

    message: str


@dataclass(frozen=True, slots=True)
class SequenceFailed:
    """Why one sequence ended without a finish reason; rebuilt as an exception in the daemon."""

    kind: Literal["unsupported", "backend"]
    message: str
    feature: str = ""  # UnsupportedFeature's, for "unsupported"


@dataclass(slots=True)
class Step:
    outputs: list[tuple[int, list[TokenEvent] | SequenceFailed]] = field(default_factory=list)
    decode_steps: int = 0  # the engine's decode steps so far, for the daemon's view of it


@dataclass(frozen=True, slots=True)
class Embedded:
    key: int
    result: tuple[tuple[float, ...], ...] | SequenceFailed
