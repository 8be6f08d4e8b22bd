"""The inference log record of CONTRACT.md section 6, built from what the request produced."""

from __future__ import annotations

import json
from typing import Any

from edge_agent.engine.scheduler import GenerationClock
from edge_agent.logbook import new_record_id
from edge_agent.protocol.logs import LogRecord
from edge_agent.server.state import AppState


def request_body_for_log(raw: bytes) -> Any:
    """The body as received: parsed JSON where it parses, the text where it does not."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")


def build_record(
    state: AppState,
    *,
    endpoint: str,
    accepted_ms: int,
    body: Any,
    response_json: str | None,
    params: dict[str, Any],
    clock: GenerationClock,
    prompt_tokens: int,
    status: str,
    error: str | None = None,
) -> dict[str, Any]:
    manifest = state.manifest
    record = {
        "id": new_record_id(),
        "time": accepted_ms,
        "pipeline": state.settings.pipeline,
        "model": {"name": manifest.name, "version": manifest.version, "sha": manifest.sha256},
        "backend": state.backend.info.name,
        "endpoint": endpoint,
        "in": body,
        "out": {"json": response_json},
        "params": params,
        "metrics": {
            "ttft": clock.ttft,
            "tps": clock.tps,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": clock.completion_tokens,
            "elapsed_s": clock.elapsed_s,
        },
        "status": status,
        "error": error,
    }
    return LogRecord.model_validate(record).as_dict()
