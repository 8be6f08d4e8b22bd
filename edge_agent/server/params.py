"""The effective parameters of a request: the request over the model's defaults, typed once.

Three layers, highest first: what the request set, the model's configured defaults
(the manifest's ``[openai.*_config]``), and the engine's own neutral values (the
defaults of ``SamplingParams``, the one place they are written). The result is logged
as the record's ``params`` and yields each sequence's ``SamplingParams``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.engine.types import SamplingParams, StructuredOutput
from edge_agent.manifest import ModelManifest
from edge_agent.protocol.openai import (
    SAMPLING_FIELDS,
    ChatCompletionRequest,
    JsonObjectFormat,
    JsonSchemaResponseFormat,
    ResponseFormat,
    SamplingFields,
)

_ENGINE = SamplingParams(max_tokens=1)  # read for its defaults only


class EffectiveParams(BaseModel):
    """What one request generates with; every value concrete, as the log records it."""

    model_config = ConfigDict(frozen=True)

    # None: as many as the context window leaves after the prompt.
    max_tokens: int | None = None
    temperature: float = _ENGINE.temperature
    top_p: float = _ENGINE.top_p
    top_k: int = _ENGINE.top_k
    min_p: float = _ENGINE.min_p
    stop: list[str] = Field(default_factory=list)
    seed: int | None = _ENGINE.seed
    presence_penalty: float = _ENGINE.presence_penalty
    frequency_penalty: float = _ENGINE.frequency_penalty
    repetition_penalty: float = _ENGINE.repetition_penalty
    logit_bias: dict[int, float] = Field(default_factory=dict)
    n: int = 1
    response_format: ResponseFormat | None = None

    def sampling(self, *, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        """The engine's parameters for choice ``choice`` of this request."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),  # -1 and 0 both mean no top-k cut
            min_p=self.min_p,
            # Choices of one request differ from each other, yet repeat with the same seed.
            seed=None if self.seed is None else self.seed + choice,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=dict(self.logit_bias),
            logprobs=logprobs,
            structured_output=_structured_output(self.response_format),
        )

    def for_log(self) -> dict[str, Any]:
        """The record's ``params``: JSON values under the request's own names."""
        return self.model_dump(mode="json", by_alias=True)


def parse_defaults(defaults: Mapping[str, Any], where: str) -> SamplingFields:
    """A model's configured defaults, held to the rules a request's parameters are."""
    try:
        return SamplingFields.model_validate_json(json.dumps(dict(defaults)))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{where}: {field}: {first['msg']}") from None


def model_defaults(manifest: ModelManifest, endpoint: str) -> SamplingFields:
    """The manifest's defaults for an endpoint (native ``/infer`` takes the completions')."""
    if endpoint == "chat/completions":
        return parse_defaults(
            manifest.openai.chat_completion_config, "openai.chat_completion_config"
        )
    return parse_defaults(manifest.openai.completion_config, "openai.completion_config")


def served_manifest(manifest: ModelManifest, openai_enabled: bool | None) -> ModelManifest:
    """The manifest as this daemon serves it: the settings' OpenAI switch applied, and its
    defaults checked (ValueError), so a default no request could carry fails the model's
    start, not a request."""
    if openai_enabled is not None:
        openai = manifest.openai.model_copy(update={"enabled": openai_enabled})
        manifest = manifest.model_copy(update={"openai": openai})
    model_defaults(manifest, "completions")
    model_defaults(manifest, "chat/completions")
    return manifest


def effective_params(request: SamplingFields, defaults: SamplingFields) -> EffectiveParams:
    """The request's parameters over the model's defaults over the engine's."""
    values: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        given = getattr(request, name)
        value = given if given is not None else getattr(defaults, name)
        if value is not None:
            values[name] = value
    if (
        isinstance(request, ChatCompletionRequest)
        and request.max_tokens is None
        and request.max_completion_tokens is not None
    ):
        values["max_tokens"] = request.max_completion_tokens  # chat's newer name for it
    stop = values.get("stop")
    if isinstance(stop, str):
        values["stop"] = [stop]
    if "logit_bias" in values:
        values["logit_bias"] = {int(token): bias for token, bias in values["logit_bias"].items()}
    return EffectiveParams(**values)


def _structured_output(response_format: ResponseFormat | None) -> StructuredOutput | None:
    if isinstance(response_format, JsonObjectFormat):
        return StructuredOutput("json_object")
    if isinstance(response_format, JsonSchemaResponseFormat):
        return StructuredOutput("json_schema", json.dumps(response_format.json_schema.schema_))
    return None
