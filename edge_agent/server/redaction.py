"""``logs.store_text = false``: a record without prompt or completion text, metrics kept.

Applied as the record is built, so the text never reaches the disk or the collector.
What stays: the request's parameters, the response's ids, finish reasons and usage
(``ttft``, ``tps``, token counts), the status and the error.
"""

from __future__ import annotations

import json
from typing import Any

# Request fields that carry the user's text (OpenAI chat, completions and embeddings,
# native records).
_TEXT_FIELDS = frozenset({"prompt", "messages", "suffix", "text", "input"})
# Per choice, what the client was told that is not text.
_CHOICE_FIELDS = ("index", "finish_reason", "stop_reason")


def redact_request(body: Any) -> Any:
    """The request body without its text fields; a body that was not JSON becomes None."""
    if isinstance(body, dict):
        return {key: value for key, value in body.items() if key not in _TEXT_FIELDS}
    if isinstance(body, list):  # native pandas-records: one {"text": ...} per row
        return [redact_request(row) for row in body]
    return None


def redact_response(response_json: str | None) -> str | None:
    """The response (one JSON string) with choices reduced to their index and finish reason."""
    if response_json is None:
        return None
    response = json.loads(response_json)
    if isinstance(response, dict):
        choices = response.get("choices")
        if isinstance(choices, list):
            response["choices"] = [
                {key: choice[key] for key in _CHOICE_FIELDS if key in choice}
                for choice in choices
                if isinstance(choice, dict)
            ]
    elif isinstance(response, list):  # native: keep each output's time and metadata
        response = [
            {key: value for key, value in row.items() if key not in ("in", "out")}
            for row in response
            if isinstance(row, dict)
        ]
    return json.dumps(response, separators=(",", ":"))
