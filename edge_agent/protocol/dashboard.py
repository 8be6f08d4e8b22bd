"""The box's own page: the series it draws (``GET /stats``) and the live state (``GET /status``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DURATION_PATTERN = r"^[1-9][0-9]{0,5}[smhd]$"
MAX_WINDOW_S = 7 * 86_400
MAX_POINTS = 1500
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def duration_s(text: str) -> int:
    """Seconds in a duration such as ``90s``, ``15m``, ``24h`` or ``7d``."""
    return int(text[:-1]) * _UNIT_S[text[-1]]


class StatsQuery(BaseModel):
    """``GET /stats`` query: the window to cover and the bucket width."""

    model_config = ConfigDict(extra="ignore")
    window: str = Field(
        default="1h",
        pattern=DURATION_PATTERN,
        description="how far back: 15m, 1h, 24h, 7d (at most 7d)",
    )
    step: str | None = Field(
        default=None,
        pattern=DURATION_PATTERN,
        description="bucket width, whole minutes (whole quarter hours beyond 48h); "
        "default: 1m up to 1h windows, 15m up to 24h, 1h beyond",
    )

    @field_validator("window")
    @classmethod
    def _window_in_range(cls, value: str) -> str:
        if not 60 <= duration_s(value) <= MAX_WINDOW_S:
            raise ValueError("from 1m to 7d")
        return value

    @field_validator("step")
    @classmethod
    def _whole_minutes(cls, value: str | None) -> str | None:
        if value is not None and duration_s(value) % 60:
            raise ValueError("a whole number of minutes")
        return value

    def window_s(self) -> int:
        return duration_s(self.window)

    def step_s(self) -> int:
        if self.step is not None:
            return duration_s(self.step)
        window = self.window_s()
        if window <= 3600:
            return 60
        return 900 if window <= 86_400 else 3600

    def step_text(self) -> str:
        step = self.step_s()
        return f"{step // 3600}h" if step % 3600 == 0 else f"{step // 60}m"


class LatencyPoint(BaseModel):
    """One time bucket of the ttft or tps series."""

    time: int = Field(description="bucket start, epoch milliseconds")
    count: int = Field(description="records in the bucket with this value")
    p50: float = Field(description="median")
    p95: float = Field(description="95th percentile")


class RequestPoint(BaseModel):
    """One time bucket of requests: how many, how they ended, where they went."""

    time: int = Field(description="bucket start, epoch milliseconds")
    total: int
    by_status: dict[str, int] = Field(description="record status (ok, error, cancelled): count")
    by_endpoint: dict[str, int]
    prompt_tokens: int
    completion_tokens: int


class StatsSeries(BaseModel):
    """Per-bucket series from the durable inference log; only buckets with requests are listed."""

    object: Literal["stats"] = "stats"
    window: str = Field(description="the window asked for, e.g. 1h")
    step: str = Field(description="the bucket width, e.g. 1m")
    start: int = Field(description="first bucket's start, epoch milliseconds")
    end: int = Field(description="last bucket's end, epoch milliseconds")
    relative_error: float = Field(
        description="percentiles are within this fraction of the exact value (log-scale bins)"
    )
    ttft: list[LatencyPoint] = Field(description="seconds to the first token")
    tps: list[LatencyPoint] = Field(description="completion tokens per second")
    requests: list[RequestPoint]


class ModelState(BaseModel):
    name: str
    version: str
    sha: str = Field(description="sha256 of the weights")
    status: Literal["Running", "Error", "Loading"]


class EngineState(BaseModel):
    """The backend and how it is configured."""

    backend: str = Field(description="llamacpp or vllm")
    configuration: str | None = Field(
        default=None, description="llama.cpp CPU configuration: repack, no_repack or plain"
    )
    configuration_reason: str | None = None
    detail: str = ""
    cpu_features: list[str] = Field(
        default_factory=list, description="CPU features the engine's build uses on this box"
    )
    threads: int
    slots: int = Field(description="sequences decoded together")
    context_length: int
    prefix_cache: bool
    restarts: int
    pid: int | None = None


class QueueState(BaseModel):
    in_flight: int = Field(description="requests admitted: decoding or waiting")
    busy_slots: int
    slots: int
    queued: int
    max_queue: int


class LogState(BaseModel):
    enabled: bool
    records: int = 0
    disk_bytes: int = 0
    max_bytes: int = 0
    append_failures: int = 0


class UploadState(BaseModel):
    enabled: bool = Field(description="a collector URL is configured")
    url: str | None = Field(default=None, description="the collector, without credentials")
    backlog_records: int = 0
    backlog_age_s: float | None = Field(
        default=None, description="age of the oldest record not yet uploaded"
    )
    last_success: int | None = Field(
        default=None, description="last acknowledged upload since start, epoch milliseconds"
    )
    last_error: str | None = None
    successes: int = 0
    failures: int = 0
    uploaded_records: int = 0
    dropped_records: int = Field(default=0, description="deleted by the storage cap, never sent")
    parked_records: int = 0


BoxState = Literal["ready", "loading", "error", "restarting", "swapping", "draining"]


class BoxStatus(BaseModel):
    """What the page shows beside the charts, read live."""

    object: Literal["status"] = "status"
    time: int = Field(description="the box's clock, epoch milliseconds")
    pipeline: str
    ready: bool
    state: BoxState
    reason: str
    uptime_s: float
    model: ModelState
    engine: EngineState
    queue: QueueState
    logs: LogState
    upload: UploadState
