"""structlog set-up and the daemon's Prometheus series (CONTRACT.md section 7)."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog
from prometheus_client import Counter, Gauge, Histogram

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400, 1000)

REQUESTS = Counter(
    "edge_agent_requests", "Inference requests by endpoint and outcome", ["endpoint", "status"]
)
TTFT = Histogram(
    "edge_agent_ttft_seconds",
    "Seconds from acceptance to the first completion token",
    ["endpoint", "model"],
    buckets=_TTFT_BUCKETS,
)
TPS = Histogram(
    "edge_agent_tps",
    "Completion tokens per second, acceptance to last token",
    ["endpoint", "model"],
    buckets=_TPS_BUCKETS,
)
PROMPT_TOKENS = Counter("edge_agent_prompt_tokens", "Prompt tokens processed")
COMPLETION_TOKENS = Counter("edge_agent_completion_tokens", "Completion tokens generated")
IN_FLIGHT = Gauge("edge_agent_requests_in_flight", "Sequences admitted and not finished")
ENGINE_RESTARTS = Counter(
    "edge_agent_engine_restarts",
    "Engine processes that died and were started again, by why they died",
    ["reason"],
)
QUEUED = Gauge("edge_agent_requests_queued", "Sequences admitted and waiting for a slot")
# Past http.max_connections: idle connections closed for a newcomer, newcomers refused.
CONNECTIONS_EVICTED = Counter(
    "edge_agent_http_connections_evicted", "Idle connections closed to stay within the cap"
)
CONNECTIONS_REFUSED = Counter(
    "edge_agent_http_connections_refused", "Connections answered 503: every one was busy"
)


def observe_request(
    *,
    endpoint: str,
    model: str,
    status: str,
    ttft: float | None,
    tps: float | None,
    prompt_tokens: int,
    completion_tokens: int,
) -> None:
    """Count one finished request: exactly its own ttft and tps, the numbers it reported."""
    REQUESTS.labels(endpoint=endpoint, status=status).inc()
    if ttft is not None:
        TTFT.labels(endpoint=endpoint, model=model).observe(ttft)
    if tps is not None:
        TPS.labels(endpoint=endpoint, model=model).observe(tps)
    PROMPT_TOKENS.inc(prompt_tokens)
    COMPLETION_TOKENS.inc(completion_tokens)


class _NeverRaisingPrintLogger(structlog.PrintLogger):
    """Drops a line it cannot write (a full disk, a reader that went away): a log line must
    never fail the request it describes."""

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except (OSError, ValueError):
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _stderr_logger(*args: object) -> _NeverRaisingPrintLogger:
    return _NeverRaisingPrintLogger(sys.stderr)


def configure_logging(log_format: Literal["auto", "json", "console"] = "auto") -> None:
    """JSON lines under systemd or when piped; readable colours on a terminal."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )


MODEL_INFO = Gauge(
    "edge_agent_model_info",
    "The model serving now: 1 for its name, weights sha256 and version",
    ["name", "sha", "version"],
)


def set_model_info(name: str, sha: str, version: str) -> None:
    """One series for the model serving; a swap replaces it rather than adding one."""
    MODEL_INFO.clear()
    MODEL_INFO.labels(name=name, sha=sha, version=version).set(1)
