"""A candidate model's canary: one temperature-0 prompt, run end to end before it serves.

The start-up self-check proves the engine decodes; the canary proves the model says
what it said where it was qualified: the digest of its greedy text is recorded, and
compared with the manifest's when the manifest gives one.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from edge_agent.engine.scheduler import GenerationClock, Scheduler
from edge_agent.engine.types import GenerationRequest, SamplingParams


@dataclass(frozen=True, slots=True)
class CanaryResult:
    text: str
    sha256: str  # of the text, UTF-8
    tokens: int
    expected_sha256: str | None

    @property
    def passed(self) -> bool:
        if self.tokens == 0:
            return False
        return self.expected_sha256 is None or self.sha256 == self.expected_sha256

    def describe(self) -> str:
        if self.tokens == 0:
            return "canary produced no tokens"
        if not self.passed:
            return (
                f"canary text has sha256 {self.sha256}, the manifest expects "
                f"{self.expected_sha256}: {self.text!r}"
            )
        return f"canary passed ({self.tokens} tokens, sha256 {self.sha256[:12]})"


async def run_canary(
    scheduler: Scheduler, prompt: str, *, max_tokens: int, expected_sha256: str | None
) -> CanaryResult:
    """Generate from ``prompt`` greedily; raises what the backend raises."""
    backend = scheduler.backend
    tokens = backend.tokenize(prompt, add_special=True, parse_special=False)
    request = GenerationRequest(
        request_id=f"canary-{uuid.uuid4().hex}",
        prompt_tokens=tokens,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    clock = GenerationClock()
    pieces: list[str] = []
    with scheduler.admit(1):
        async for step in scheduler.run(request, stops=(), clock=clock):
            pieces.append(step.text)
    text = "".join(pieces)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return CanaryResult(text, digest, clock.completion_tokens, expected_sha256)
