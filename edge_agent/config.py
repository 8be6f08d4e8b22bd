"""Daemon configuration: one pydantic model from a TOML file, ``EDGE_AGENT_*`` env and flags.

Precedence, highest first: command-line flags, environment (``EDGE_AGENT_PORT``,
nested with ``__`` as in ``EDGE_AGENT_LOGS__MAX_BYTES``), the TOML file, defaults.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/config.toml")
DEFAULT_MODEL = "smollm2-135m-instruct"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
}


def parse_size(value: int | str) -> int:
    """Bytes from ``1048576``, ``"512Mi"`` or ``"10Gi"`` (Kubernetes-style units)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes or units like 512Mi, 10Gi)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogSettings(_Section):
    enabled: bool = True
    # full: every commit is fsynced before the response ends (survives power loss);
    # normal: no fsync in the request path (survives kill -9 and crashes of the daemon,
    # not of the box): the documented speed-up for boxes on reliable power.
    sync: Literal["full", "normal"] = "full"
    # Storage cap for the local inference log; LOCAL_INFERENCE_STORAGE is accepted too.
    max_bytes: int = 1024**3
    # False drops prompt and completion text from each record as it is written, keeping
    # the parameters, the metrics and the status: a box whose prompts must not be kept.
    store_text: bool = True

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_size(value)


class UploadSettings(_Section):
    url: str | None = None
    token: str | None = None
    batch_records: int = Field(default=500, ge=1)
    batch_age_s: float = Field(default=5.0, gt=0)
    max_backoff_s: float = Field(default=300.0, gt=0)


KvCacheType = Literal["f16", "bf16", "q8_0", "q4_0"]


class EngineSettings(_Section):
    """The llama.cpp engine process and how the daemon supervises it."""

    # Off runs llama.cpp inside the daemon: a crash in it then ends the daemon too.
    isolated: bool = True
    # Where the verdict of the CPU-configuration probes is kept (per build, CPU and model);
    # None: <XDG_CACHE_HOME or ~/.cache>/edge-agent/engine-probes.json.
    probe_cache: Path | None = None
    restart_backoff_s: float = Field(default=0.5, gt=0)
    max_restart_backoff_s: float = Field(default=30.0, gt=0)
    # This many crashes within crash_window_s rule the configuration out: the next one
    # down the ladder serves.
    crashes_before_fallback: int = Field(default=3, ge=1)
    crash_window_s: float = Field(default=600.0, gt=0)
    # An engine with work in hand that says nothing this long is hung, and is restarted.
    stall_s: float = Field(default=120.0, gt=0)

    def probe_cache_path(self) -> Path:
        if self.probe_cache is not None:
            return self.probe_cache
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "edge-agent" / "engine-probes.json"


class SpeculativeSettings(_Section):
    """Speculative decoding in the llama.cpp engine: exact, so the text never changes.

    ``ngram`` drafts a sequence's next tokens from where its last ones appeared in the
    prompt or the answer so far, and verifies them in the step's batch; each sequence
    drafts only while its acceptance pays for the verifying (docs/engine.md).
    """

    mode: Literal["off", "ngram"] = "ngram"
    # Tokens drafted after the sampled one, at most.
    max_draft: int = Field(default=8, ge=1, le=64)
    # The shortest and longest match of a sequence's last tokens a draft is taken from.
    min_ngram: int = Field(default=3, ge=1, le=16)
    max_ngram: int = Field(default=4, ge=1, le=16)
    # Cost of verifying one more token, as a fraction of a one-token decode; None
    # measures it when the engine loads.
    verify_cost: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ngram_range(self) -> SpeculativeSettings:
        if self.min_ngram > self.max_ngram:
            raise ValueError("min_ngram must not exceed max_ngram")
        return self


class HttpSettings(_Section):
    """What one client may hold: time to send a request, connections, a stalled stream.

    A LAN box meets port scanners, half-open sockets and clients that stop reading; each
    of these ends after a bounded time and holds a bounded share of the daemon.
    """

    # A connection has this long to send a request's head, and an idle keep-alive
    # connection is closed after it.
    header_timeout_s: float = Field(default=15.0, gt=0)
    # From the head to the last byte of the body.
    body_timeout_s: float = Field(default=60.0, gt=0)
    # Open connections at most; past it the oldest idle one is closed for a newcomer, or
    # the newcomer gets a 503 when none is idle. Kept below the file-descriptor limit
    # (systemd's LimitNOFILE) with room for the log store, the engine and the uploader.
    max_connections: int = Field(default=1024, ge=1)
    # A stream whose client has not taken a write for this long is ended and recorded
    # as cancelled; until then it holds at most about write_buffer_bytes plus 64 KiB.
    stream_stall_s: float = Field(default=30.0, gt=0)
    write_buffer_bytes: int = Field(default=64 * 1024, ge=4096)

    @field_validator("write_buffer_bytes", mode="before")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_size(value)


class VllmOptions(BaseModel):
    """Engine settings for the vLLM backend: the ``[vllm]`` section of the config."""

    model_config = ConfigDict(extra="forbid")

    # Share of the GPU's memory vLLM may take for weights, activations and KV cache.
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    # Tokens per sequence; None takes settings.context_size, then the manifest's.
    max_model_len: int | None = Field(default=None, ge=64)
    tensor_parallel_size: int = Field(default=1, ge=1)
    # Sequences decoded together; None takes settings.parallel.
    max_num_seqs: int | None = Field(default=None, ge=1)
    dtype: str = "auto"
    # Skip CUDA graph capture: a faster start and less memory, slower decoding.
    enforce_eager: bool = False
    # CONTRACT.md section 2: temperature-0 text must not depend on batching. vLLM's
    # batch-invariant kernels give that; turning them off is the documented speed-up.
    batch_invariant: bool = True
    # The most top_logprobs a request may ask for (OpenAI allows 20).
    max_logprobs: int = Field(default=20, ge=0)
    trust_remote_code: bool = False
    # Any other AsyncEngineArgs field, passed through as is (quantization, ...).
    engine_args: dict[str, Any] = Field(default_factory=dict)


class Settings(BaseSettings):
    """Everything the daemon is started with."""

    model_config = SettingsConfigDict(
        env_prefix="EDGE_AGENT_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    pipeline: str = Field(default="edge-llm", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    # A manifest path, or the name of one in the models directories.
    model: str = DEFAULT_MODEL
    backend: Literal["auto", "llamacpp", "vllm"] = "auto"
    # Overrides the manifest's [openai] enabled flag: off serves the native /infer instead.
    openai_enabled: bool | None = None
    threads: int | None = Field(default=None, ge=1)
    # llama.cpp's weight repacking (AMX, CPU_REPACK): auto serves the fastest configuration
    # that decodes on this box; on pins it (no fallback); off never repacks.
    cpu_repack: Literal["auto", "on", "off"] = "auto"
    # Tokens per sequence; None takes the manifest's context length.
    context_size: int | None = Field(default=None, ge=64)
    parallel: int = Field(default=4, ge=1, le=64)
    max_queue: int = Field(default=64, ge=0)
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # A stream waiting for its first token sends an SSE comment this often, so proxies
    # and client read timeouts do not cut it while it queues or prefills.
    sse_ping_s: float = Field(default=10.0, gt=0)
    # Prompt-prefix reuse across requests on a sequence slot (see engine docs).
    prefix_cache: bool = True
    # llama.cpp's KV cache element type. A quantized type applies to the keys only: llama.cpp
    # refuses a quantized value cache without flash attention, which stays off (docs/engine.md).
    kv_cache_type: KvCacheType = "f16"
    state_dir: Path = Path("/var/lib/edge-agent")
    auth_token: str | None = None
    # The box's page (/, /dashboard) and its data (/stats, /status): open like /healthz,
    # or the data behind auth_token too ("token"; the page then asks for it).
    dashboard_access: Literal["open", "token"] = "open"
    # Who may read the inference log (prompts and completions) over HTTP: everyone
    # (open), holders of auth_token (token), or nobody (off). None: token when an
    # auth_token is set, open otherwise.
    logs_access: Literal["open", "token", "off"] | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # How a model swap loads the new model: beside the old one while it serves
    # (side_by_side), or after it has finished its requests (drained: a 503 window, for
    # a box without memory for two), or whichever the memory estimate allows (auto).
    model_swap: Literal["auto", "side_by_side", "drained"] = "auto"
    # Who may swap the model over HTTP (PUT /models/active): holders of auth_token, or
    # anyone ("open"). With "token" and no auth_token set, nobody may.
    model_swap_access: Literal["token", "open"] = "token"
    logs: LogSettings = LogSettings()
    http: HttpSettings = HttpSettings()
    upload: UploadSettings = UploadSettings()
    engine: EngineSettings = EngineSettings()
    vllm: VllmOptions = VllmOptions()
    speculative: SpeculativeSettings = SpeculativeSettings()

    @field_validator("max_request_bytes", mode="before")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_size(value)

    @model_validator(mode="after")
    def _logs_token_exists(self) -> Settings:
        if self.logs_access == "token" and not self.auth_token:
            raise ValueError("logs_access = 'token' needs auth_token to be set")
        return self

    @property
    def effective_logs_access(self) -> Literal["open", "token", "off"]:
        """``logs_access``, with its default resolved from ``auth_token``."""
        if self.logs_access is not None:
            return self.logs_access
        return "token" if self.auth_token else "open"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)

    # The TOML file beneath the environment and the flags: set on a class made per load.
    _toml_file: ClassVar[Path | None] = None


def _from_file(path: Path, given: dict[str, Any]) -> Settings:
    """Settings with ``path`` as the lowest source, below the environment and ``given``."""

    class FromFile(Settings):
        _toml_file = path

    # Validated once more as plain Settings, so the value compares equal to any other.
    return Settings.model_validate(FromFile(**given).model_dump())


class ConfigError(Exception):
    """A configuration that cannot start the daemon; the message is one line."""


def _one_line(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: {where}: {first['msg']}{more}"


def load_settings(config_path: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from file, environment and explicit overrides (None means unset)."""
    path = config_path
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            with path.open("rb") as handle:
                tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    given = {key: value for key, value in overrides.items() if value is not None}
    storage = os.environ.get("LOCAL_INFERENCE_STORAGE")
    try:
        settings = Settings(**given) if path is None else _from_file(path, given)
        if storage and "EDGE_AGENT_LOGS__MAX_BYTES" not in os.environ:
            settings.logs.max_bytes = parse_size(storage)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, str(path) if path else "settings")) from None
    except ValueError as exc:
        raise ConfigError(f"LOCAL_INFERENCE_STORAGE: {exc}") from None
    return settings
