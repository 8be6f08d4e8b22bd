"""One exception per error row of CONTRACT.md section 4, and the OpenAI envelope they render to."""

from __future__ import annotations

from typing import ClassVar

from edge_agent.protocol.openai import ErrorDetail, ErrorResponse

OPENAI_OFF_MESSAGE = (
    "Inference failed. Please apply the appropriate OpenAI configurations to the models "
    "deployed in this pipeline. For additional help contact support@wallaroo.ai or your "
    "Wallaroo technical representative."
)
OPENAI_ON_MESSAGE = (
    "Inference failed. Please apply the appropriate OpenAI extensions to the inference "
    "endpoint. For additional help contact support@wallaroo.ai or your Wallaroo technical "
    "representative."
)


class ApiError(Exception):
    """An error a client sees: HTTP status plus the OpenAI error envelope."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def envelope(self) -> ErrorResponse:
        detail = ErrorDetail(
            message=self.message, type=self.error_type, param=self.param, code=self.code
        )
        return ErrorResponse(error=detail)


class InvalidRequest(ApiError):
    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """Carries the prompt's length and the window, so a client can trim without parsing text."""

    def __init__(
        self, message: str, *, n_prompt_tokens: int, n_ctx: int, param: str | None = "messages"
    ) -> None:
        super().__init__(message, param=param, code="context_length_exceeded")
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx

    def envelope(self) -> ErrorResponse:
        response = super().envelope()
        response.error.n_prompt_tokens = self.n_prompt_tokens
        response.error.n_ctx = self.n_ctx
        return response


class OpenAIDisabled(InvalidRequest):
    def __init__(self) -> None:
        super().__init__(OPENAI_OFF_MESSAGE)


class OpenAIEnabled(InvalidRequest):
    def __init__(self) -> None:
        super().__init__(OPENAI_ON_MESSAGE)


class BodyTooLarge(ApiError):
    status = 413
    error_type = "invalid_request_error"


class BodyTimeout(ApiError):
    """The body did not arrive in time: a stalled client, or a Content-Length it never sends."""

    status = 408
    error_type = "invalid_request_error"


class AuthenticationFailed(ApiError):
    status = 401
    error_type = "authentication_error"


class NotFound(ApiError):
    status = 404
    error_type = "invalid_request_error"


class MethodNotAllowed(ApiError):
    status = 405
    error_type = "invalid_request_error"


class RateLimited(ApiError):
    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class TryAgain(ApiError):
    """A 503 a client may send again after ``Retry-After``; each kind has its own code."""

    status = 503
    error_type = "server_error"
    error_code: ClassVar[str]
    default_retry_after_s: ClassVar[int]

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        wait = self.default_retry_after_s if retry_after_s is None else retry_after_s
        super().__init__(message, code=self.error_code, headers={"Retry-After": str(wait)})


class ModelNotReady(TryAgain):
    error_code = "model_not_ready"
    default_retry_after_s = 5


class EngineRestarting(TryAgain):
    """New requests while the engine process restarts after a crash."""

    error_code = "engine_restarting"
    default_retry_after_s = 2


class EngineRestarted(TryAgain):
    """A request the engine process died under: it ended, and may be sent again."""

    error_code = "engine_restarted"
    default_retry_after_s = 2


class ModelSwapping(TryAgain):
    """New requests in the short window of a drained model swap (no memory for two)."""

    error_code = "model_swapping"
    default_retry_after_s = 10


class Draining(ApiError):
    status = 503
    error_type = "server_error"

    def __init__(self) -> None:
        super().__init__(
            "the daemon is shutting down", code="shutting_down", headers={"Retry-After": "5"}
        )


class Conflict(ApiError):
    status = 409
    error_type = "invalid_request_error"


class Forbidden(ApiError):
    status = 403
    error_type = "invalid_request_error"


class SwapFailed(ApiError):
    """A candidate model refused: its weights, its load or its canary failed."""

    status = 422
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_swap_failed")


class TooManyConnections(ApiError):
    """A connection past http.max_connections while every open one has a request running."""

    status = 503
    error_type = "server_error"

    def __init__(self) -> None:
        super().__init__(
            "too many open connections; retry shortly",
            code="too_many_connections",
            headers={"Retry-After": "1"},
        )


class GenerationTimeout(ApiError):
    status = 504
    error_type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="timeout")


class InternalError(ApiError):
    status = 500
    error_type = "server_error"
