"""The inference log record (CONTRACT.md section 6), the ``GET /logs`` page, ``POST /logs``.

The same record is committed to the store, uploaded to the collector and read back
from ``/logs``: one model for all three.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

RecordStatus = Literal["ok", "error", "cancelled"]
RecordEndpoint = Literal["completions", "chat/completions", "embeddings", "infer"]
# The most records one read returns (the store's own bound too).
MAX_LOG_PAGE = 1000


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


class LogQuery(BaseModel):
    """``POST /logs``: which records; ``{}`` asks for the latest 100."""

    # A misspelt filter is a 400 naming it, not a silently unfiltered answer.
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(default=100, ge=1, le=MAX_LOG_PAGE, description="at most this many")
    since: str | None = Field(default=None, description="only records after this id (exclusive)")


class LogRecords(RootModel[list[LogRecord]]):
    """``POST /logs`` answer: pandas-records, oldest first (``iloc[-1]`` is the latest)."""
