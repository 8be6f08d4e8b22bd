"""What can go wrong in the engine, said in the engine's own words.

These carry what happened (a queue bound, a deadline, a feature a backend lacks, by
the engine's own name for it), never how a client hears of it: statuses, headers and
request field names are ``server/``'s to say (``server/engine_errors.py``).
"""

from __future__ import annotations


class EngineError(Exception):
    """Anything the scheduler or a backend refuses or fails at."""


class BackendError(EngineError, RuntimeError):
    """A backend failed while loading or generating."""


class EngineRestarted(BackendError):
    """The engine process died under a sequence; a new one is being started."""


class EngineUnavailable(BackendError):
    """The engine cannot take a sequence now (it is restarting); the message says why."""


class UnsupportedFeature(EngineError, ValueError):
    """A backend cannot honour part of a request.

    ``feature`` is the engine's name for it: a ``SamplingParams`` field
    (``structured_output``, ``logit_bias``, ``logprobs``...), ``prompt_tokens``, or
    ``chat_template`` for messages the model's template cannot render.
    """

    def __init__(self, feature: str, message: str) -> None:
        super().__init__(message)
        self.feature = feature
        self.message = message


class QueueFull(EngineError):
    """No room for more sequences; one should free in about ``estimated_wait_s``."""

    def __init__(self, *, in_flight: int, estimated_wait_s: float) -> None:
        super().__init__(f"too many sequences in flight ({in_flight}); retry shortly")
        self.in_flight = in_flight
        self.estimated_wait_s = estimated_wait_s


class DeadlineExceeded(EngineError):
    """A sequence ran past the request's deadline and was stopped."""

    def __init__(self, deadline_s: float) -> None:
        super().__init__(f"request exceeded its deadline of {deadline_s:g}s")
        self.deadline_s = deadline_s


class ShuttingDown(EngineError):
    """The engine is draining: it finishes what it has and takes nothing new."""

    def __init__(self) -> None:
        super().__init__("the daemon is shutting down")
