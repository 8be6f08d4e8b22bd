"""Engine errors as a client hears them: one table, no model needed."""

from __future__ import annotations

import pytest

from edge_agent.engine.errors import (
    BackendError,
    DeadlineExceeded,
    EngineRestarted,
    EngineUnavailable,
    QueueFull,
    ShuttingDown,
    UnsupportedFeature,
)
from edge_agent.server.engine_errors import as_api_error


def test_a_full_queue_is_429_with_the_estimated_wait_rounded_up() -> None:
    error = as_api_error(QueueFull(in_flight=5, estimated_wait_s=2.2))
    assert (error.status, error.error_type) == (429, "rate_limit_error")
    assert error.headers["Retry-After"] == "3"


def test_a_wait_under_a_second_still_asks_for_one() -> None:
    error = as_api_error(QueueFull(in_flight=1, estimated_wait_s=0.01))
    assert error.headers["Retry-After"] == "1"


def test_draining_is_503_with_retry_after() -> None:
    error = as_api_error(ShuttingDown())
    assert (error.status, error.code) == (503, "shutting_down")
    assert error.headers["Retry-After"]


def test_a_deadline_is_504_timeout() -> None:
    error = as_api_error(DeadlineExceeded(0.5))
    assert (error.status, error.code) == (504, "timeout")
    assert "0.5s" in error.message


def test_a_request_the_engine_died_under_is_a_503_it_may_send_again() -> None:
    error = as_api_error(EngineRestarted("the engine process died (SIGSEGV); retry shortly"))
    assert (error.status, error.code) == (503, "engine_restarted")
    assert error.headers["Retry-After"] and "SIGSEGV" in error.message


def test_a_request_while_the_engine_restarts_is_a_503_naming_the_restart() -> None:
    error = as_api_error(EngineUnavailable("the engine process died (SIGKILL) and is restarting"))
    assert (error.status, error.code) == (503, "engine_restarting")
    assert error.headers["Retry-After"]


def test_a_backend_failure_is_500() -> None:
    error = as_api_error(BackendError("decode failed"))
    assert error.status == 500 and "decode failed" in error.message


@pytest.mark.parametrize(
    ("feature", "prompt_param", "param"),
    [
        ("structured_output", "prompt", "response_format"),
        ("chat_template", "messages", "messages"),
        ("prompt_tokens", "prompt", "prompt"),
        ("logit_bias", "prompt", "logit_bias"),
        ("logprobs", "messages", "logprobs"),
        ("sampling", "prompt", None),
    ],
)
def test_an_unsupported_feature_is_400_naming_the_request_parameter(
    feature: str, prompt_param: str, param: str | None
) -> None:
    error = as_api_error(UnsupportedFeature(feature, "cannot"), prompt_param=prompt_param)
    assert (error.status, error.param) == (400, param)
    assert error.message == (f"{param}: cannot" if param else "cannot")
