"""The edge surface: pipelines, deployed models, health and readiness, and where paths live."""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OPENAI_PREFIX = "/infer/openai/v1"
SPEC_PATH = "/openapi.yaml"
# Paths that stay open when a bearer token is configured: health, metrics, this document.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", SPEC_PATH})
# The box's page and its files: code without data, loadable by any browser (a navigation
# cannot carry a bearer token); what it shows comes from the data paths.
DASHBOARD_PAGES = ("/", "/dashboard")
DASHBOARD_ASSETS = {"/dashboard/app.js": "app.js", "/dashboard/app.css": "app.css"}
DASHBOARD_DATA_PATHS = frozenset({"/stats", "/status"})


@functools.cache
def open_paths(dashboard_access: Literal["open", "token"]) -> frozenset[str]:
    """Paths served without the bearer token; the page's data joins them when it is open."""
    paths = OPEN_PATHS | set(DASHBOARD_PAGES) | set(DASHBOARD_ASSETS)
    return paths | DASHBOARD_DATA_PATHS if dashboard_access == "open" else paths


LOGS_PATH = "/logs"
# Paths that hand out inference records (prompts and completions): guarded by the
# logs_access setting rather than by auth_token alone.
LOG_PATHS = frozenset({LOGS_PATH})


class PipelineStatus(BaseModel):
    id: str
    status: Literal["Running", "Error"]
    version: str = Field(
        description="the pipeline's version: a uuid that changes with its model or weights"
    )


class PipelineList(BaseModel):
    pipelines: list[PipelineStatus]


class EngineStatus(BaseModel):
    """The engine behind the model: its CPU configuration, its process, its restarts."""

    configuration: str | None = Field(
        default=None, description="llama.cpp CPU configuration: repack, no_repack or plain"
    )
    reason: str | None = Field(default=None, description="why this configuration serves")
    restarts: int = Field(default=0, description="engine processes restarted after dying")
    pid: int | None = Field(default=None, description="the engine process, when it has one")
    available: bool = True
    unavailable_reason: str | None = None


ModelRole = Literal["active", "candidate", "retiring"]


class DeployedModel(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    sha: str = Field(description="sha256 of the weights")
    status: Literal["Running", "Error", "Loading"]
    version: str
    backend: str | None = Field(default=None, description="llamacpp or vllm")
    engine: EngineStatus | None = None
    role: ModelRole = Field(
        default="active",
        description=(
            "active: serving new requests; candidate: a model a swap is loading, or the "
            "last one refused (status Error); retiring: swapped out, finishing its requests"
        ),
    )
    reason: str | None = Field(default=None, description="why a candidate is where it is")


ACTIVE_MODEL_PATH = "/models/active"


class ActiveModelRequest(BaseModel):
    """``PUT /models/active``: serve another model, swapped in without dropping requests."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1,
        description="a manifest name (installed with `edge-agent models install`) or path",
    )


class ModelSwapResult(BaseModel):
    """How a swap ended; the active model is in ``models`` as ``GET /models`` lists it."""

    outcome: Literal["swapped", "unchanged"]
    model: str
    detail: str
    mode: Literal["side_by_side", "drained"] | None = Field(
        default=None,
        description="side_by_side: loaded beside the serving model; drained: loaded after it",
    )
    canary_sha256: str | None = Field(
        default=None, description="sha256 of the canary's temperature-0 text"
    )
    seconds: float
    models: list[DeployedModel]


class DeployedModelList(BaseModel):
    models: list[DeployedModel]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: str = Field(
        description=(
            "ready, loading, error, restarting (the engine), swapping (a drained model "
            "swap) or running (while draining)"
        )
    )
    model: str | None = None
    reason: str | None = None
