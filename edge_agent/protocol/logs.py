"""The inference log record (CONTRACT.md section 6) and the ``GET /logs`` page.

The same record is committed to the store, uploaded to the collector and read back
from ``/logs``: one model for all three.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RecordStatus = Literal["ok", "error", "cancelled"]
RecordEndpoint = Literal["completions", "chat/completions", "embeddings", "infer"]


class ServedModel(BaseModel):
    name: str
    version: str
    sha: str = Field(description="sha256 of the weights")


class RecordOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    json_: str | None = Field(alias="json", description="the full response, one JSON string")


class RecordMetrics(BaseModel):
    ttft: float | None
    tps: float | None
    prompt_tokens: int
    completion_tokens: int
    elapsed_s: float


class LogRecord(BaseModel):
    """One request's record; ``in`` is the body as received (JSON, or the text that failed)."""

    # Records written by other versions may carry more fields: kept, not refused.
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    id: str = Field(description="UUIDv7: unique and sortable by time")
    time: int = Field(description="epoch milliseconds at acceptance")
    pipeline: str
    model: ServedModel
    backend: str
    endpoint: RecordEndpoint
    in_: Any = Field(alias="in")
    out: RecordOut
    params: dict[str, Any] = Field(description="the effective parameters after defaults")
    metrics: RecordMetrics
    status: RecordStatus
    error: str | None = Field(default=None, description="the message, when status is not ok")

    def as_dict(self) -> dict[str, Any]:
        """The record as stored and uploaded: ``error`` only where there is one."""
        record = self.model_dump(mode="json", by_alias=True)
        if record.get("error") is None:
            record.pop("error", None)
        return record


class LogPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[LogRecord]
    has_more: bool
