"""Engine errors as a client hears them: the HTTP status, ``Retry-After``, the OpenAI ``param``.

The one place that knows which request field an engine feature came from.
"""

from __future__ import annotations

import math

from edge_agent.engine.errors import (
    DeadlineExceeded,
    EngineError,
    EngineRestarted,
    EngineUnavailable,
    QueueFull,
    ShuttingDown,
    UnsupportedFeature,
)
from edge_agent.errors import (
    ApiError,
    Draining,
    EngineRestarting,
    GenerationTimeout,
    InternalError,
    InvalidRequest,
    RateLimited,
)
from edge_agent.errors import EngineRestarted as RestartedError

# Engine features whose OpenAI parameter has another name; the other SamplingParams
# fields (temperature, logit_bias, logprobs...) are named as the request names them.
_OPENAI_PARAMS = {
    "structured_output": "response_format",
    "chat_template": "messages",
    "embedding_input": "input",
    "embeddings": "model",  # the deployed model cannot embed, whatever the input
}


def openai_param(feature: str, *, prompt_param: str = "prompt") -> str | None:
    """The request parameter an engine feature came from (``prompt_param``: prompt or messages)."""
    if feature == "prompt_tokens":
        return prompt_param
    if feature == "sampling":  # a backend could not say which parameter
        return None
    return _OPENAI_PARAMS.get(feature, feature)


def as_api_error(error: EngineError, *, prompt_param: str = "prompt") -> ApiError:
    """What the client sees of an engine error."""
    if isinstance(error, QueueFull):
        return RateLimited(str(error), retry_after_s=max(1, math.ceil(error.estimated_wait_s)))
    if isinstance(error, ShuttingDown):
        return Draining()
    if isinstance(error, DeadlineExceeded):
        return GenerationTimeout(str(error))
    # 503s a client may send again: the engine died under the request, or is restarting.
    if isinstance(error, EngineRestarted):
        return RestartedError(str(error))
    if isinstance(error, EngineUnavailable):
        return EngineRestarting(str(error))
    if isinstance(error, UnsupportedFeature):
        param = openai_param(error.feature, prompt_param=prompt_param)
        return InvalidRequest(f"{param}: {error.message}" if param else error.message, param=param)
    return InternalError(f"generation failed: {error}")
