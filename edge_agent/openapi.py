"""The deployment's OpenAPI 3.1.1 document, generated from the same pydantic models the server uses.

What a box serves depends on its model (CONTRACT.md section 1 and the product doc's
"Endpoints differ depending on whether pipelines include models with OpenAI API
compatibility enabled"): the OpenAI paths when OpenAI compatibility is on, the native
``/infer`` paths when it is off, and the edge paths always. The schemas come from
``edge_agent.protocol``, the same classes the routes validate and serialise, so the
document cannot drift from the wire. A pure function of the settings and the manifest:
serving it is a route's job, writing it a command's.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from edge_agent.config import Settings
from edge_agent.manifest import ModelManifest
from edge_agent.protocol.dashboard import DURATION_PATTERN, BoxStatus, StatsQuery, StatsSeries
from edge_agent.protocol.edge import (
    ACTIVE_MODEL_PATH,
    DASHBOARD_ASSETS,
    DASHBOARD_PAGES,
    LOG_PATHS,
    LOGS_PATH,
    OPENAI_PREFIX,
    SPEC_PATH,
    ActiveModelRequest,
    DeployedModelList,
    Health,
    ModelSwapResult,
    PipelineList,
    Readiness,
    open_paths,
)
from edge_agent.protocol.embeddings import EmbeddingsRequest, EmbeddingsResponse
from edge_agent.protocol.logs import LogPage, LogQuery, LogRecords
from edge_agent.protocol.native import NativeOutputs, NativeRecords
from edge_agent.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from edge_agent.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizePromptRequest,
    TokenizeResponse,
)

OPENAPI_VERSION = "3.1.1"
YAML_CONTENT_TYPE = "application/yaml"
_REF = "#/components/schemas/{model}"


def _package_version() -> str:
    try:
        return importlib.metadata.version("edge-agent")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0"


# Every model that appears in the document, with the direction it travels in.
_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (CompletionRequest, "validation"),
    (ChatCompletionRequest, "validation"),
    (EmbeddingsRequest, "validation"),
    (NativeRecords, "validation"),
    (CompletionResponse, "serialization"),
    (ChatCompletionResponse, "serialization"),
    (CompletionChunk, "serialization"),
    (ChatCompletionChunk, "serialization"),
    (EmbeddingsResponse, "serialization"),
    (ModelList, "serialization"),
    (NativeOutputs, "serialization"),
    (PipelineList, "serialization"),
    (DeployedModelList, "serialization"),
    (ActiveModelRequest, "validation"),
    (ModelSwapResult, "serialization"),
    (Health, "serialization"),
    (Readiness, "serialization"),
    (LogPage, "serialization"),
    (StatsSeries, "serialization"),
    (BoxStatus, "serialization"),
    (LogQuery, "validation"),
    (LogRecords, "serialization"),
    (ErrorResponse, "serialization"),
    (TokenizePromptRequest, "validation"),
    (TokenizeChatRequest, "validation"),
    (TokenizeResponse, "serialization"),
    (DetokenizeRequest, "validation"),
    (DetokenizeResponse, "serialization"),
]


_Refs = dict[tuple[Any, JsonSchemaMode], dict[str, Any]]


@functools.cache
def _component_schemas() -> tuple[_Refs, dict[str, Any]]:
    # One generation pass for all models: pydantic names a model that differs between
    # request and response direction apart (-Input/-Output) instead of clobbering one.
    refs, top = models_json_schema(_MODELS, ref_template=_REF)
    defs: dict[str, Any] = top.get("$defs", {})
    return dict(refs), defs


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    refs, _ = _component_schemas()
    for (candidate, _mode), schema in refs.items():
        if candidate is model:
            return copy.deepcopy(schema)
    raise KeyError(model.__name__)


def openai_enabled(settings: Settings, manifest: ModelManifest) -> bool:
    """The effective switch: the settings override the manifest's ``[openai] enabled``."""
    if settings.openai_enabled is not None:
        return settings.openai_enabled
    return manifest.openai.enabled


# --- building blocks ------------------------------------------------------------------------


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": _json({"$ref": "#/components/schemas/ErrorResponse"}),
    }
    if retry_after:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    return response


_ERROR_RESPONSES: dict[str, dict[str, Any]] = {
    "BadRequest": _error(
        "Invalid request: not JSON, wrong types, out-of-range values, a missing field, "
        "the context window exceeded, or the wrong endpoint for this model's OpenAI setting"
    ),
    "Unauthorized": _error("Bearer token missing or wrong"),
    "Forbidden": _error("Not allowed on this box: a model swap with no auth_token set"),
    "NotFound": _error("No such path, pipeline or resource"),
    "Conflict": _error("Another model swap is under way"),
    "Unprocessable": _error(
        "The candidate model was refused (its sha256, its load or its canary) and the "
        "serving model keeps serving"
    ),
    "MethodNotAllowed": _error("Wrong method for this path; `Allow` lists the right ones"),
    "PayloadTooLarge": _error("Request body over the configured limit"),
    "BodyTimeout": _error("The request body did not arrive within http.body_timeout_s"),
    "TooManyRequests": _error("The request queue is full", retry_after=True),
    "InternalError": _error("Unexpected failure; the daemon logged the details"),
    "Unavailable": _error("The model is still loading or the daemon is draining", retry_after=True),
    "Timeout": _error("The request ran past the configured deadline"),
}


def _errors(*codes: str) -> dict[str, Any]:
    names = {
        "400": "BadRequest",
        "401": "Unauthorized",
        "403": "Forbidden",
        "404": "NotFound",
        "409": "Conflict",
        "405": "MethodNotAllowed",
        "408": "BodyTimeout",
        "413": "PayloadTooLarge",
        "422": "Unprocessable",
        "429": "TooManyRequests",
        "500": "InternalError",
        "503": "Unavailable",
        "504": "Timeout",
    }
    return {code: {"$ref": f"#/components/responses/{names[code]}"} for code in codes}


def _sse(chunk: type[BaseModel], description: str) -> dict[str, Any]:
    # OpenAPI before 3.2 has the schema of text/event-stream describe one event; each event's
    # data is a JSON chunk (contentSchema), and the last one is the literal [DONE].
    return {
        "schema": {
            "type": "object",
            "description": description,
            "required": ["data"],
            "properties": {
                "data": {
                    "description": "one JSON chunk per event; the last event is `[DONE]`",
                    "anyOf": [
                        {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {
                                "oneOf": [
                                    _ref(chunk),
                                    {"$ref": "#/components/schemas/ErrorResponse"},
                                ]
                            },
                        },
                        {"type": "string", "const": "[DONE]"},
                    ],
                },
                "event": {"type": "string"},
                "id": {"type": "string"},
            },
        }
    }


def _inference_operation(
    *,
    operation_id: str,
    summary: str,
    request: type[BaseModel],
    response: type[BaseModel],
    chunk: type[BaseModel],
    example: dict[str, Any],
    stream_example: dict[str, Any],
    more_examples: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": (
            "Request parameters override the model's configured defaults. With "
            "`stream: true` the answer is `text/event-stream`: `data: <chunk>` events, the "
            "last `data: [DONE]`; `usage` (with `ttft` and `tps`) comes once per stream."
        ),
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": _ref(request),
                    "examples": {
                        "basic": {"summary": "one answer", "value": example},
                        "stream": {"summary": "token streaming", "value": stream_example},
                        **(more_examples or {}),
                    },
                }
            },
        },
        "responses": {
            "200": {
                "description": "The completion; an event stream of chunks when `stream` is true",
                "content": {
                    "application/json": {"schema": _ref(response)},
                    "text/event-stream": _sse(chunk, f"One server-sent event: a {chunk.__name__}"),
                },
            },
            **_errors("400", "405", "408", "413", "429", "500", "503", "504"),
        },
    }


_TOOL_EXAMPLE: dict[str, Any] = {
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 20}},
                    "required": ["city"],
                },
            },
        }
    ],
    "tool_choice": "required",
}


def _embeddings_path(model_name: str) -> dict[str, Any]:
    example = {"model": model_name, "input": ["a factory floor", "an edge box"]}
    return {
        f"{OPENAI_PREFIX}/embeddings": {
            "post": {
                "operationId": "createEmbedding",
                "summary": "OpenAI embeddings: one L2-normalised vector per input",
                "description": (
                    "`input` is a string, a list of strings, token ids, or a list of token id "
                    "lists. `dimensions` other than the model's own vector length is a 400; "
                    "an input longer than the model's `max_input_tokens` is a 400 with code "
                    "`context_length_exceeded`."
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _ref(EmbeddingsRequest),
                            "examples": {"basic": {"summary": "two inputs", "value": example}},
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "The vectors, in the order of the inputs",
                        "content": _json(_ref(EmbeddingsResponse)),
                    },
                    **_errors("400", "404", "405", "413", "429", "500", "503", "504"),
                },
            }
        }
    }


def _openai_paths(model_name: str) -> dict[str, Any]:
    # Small max_tokens in the examples: a request built from the document answers quickly.
    prompt = {"model": model_name, "prompt": "tell me a short story", "max_tokens": 16}
    chat = {
        "model": model_name,
        "messages": [{"role": "user", "content": "you are a story teller"}],
        "max_tokens": 16,
    }
    return {
        f"{OPENAI_PREFIX}/completions": {
            "post": _inference_operation(
                operation_id="createCompletion",
                summary="OpenAI completions",
                request=CompletionRequest,
                response=CompletionResponse,
                chunk=CompletionChunk,
                example=prompt,
                stream_example={**prompt, "stream": True},
            )
        },
        f"{OPENAI_PREFIX}/chat/completions": {
            "post": _inference_operation(
                operation_id="createChatCompletion",
                summary="OpenAI chat completions",
                request=ChatCompletionRequest,
                response=ChatCompletionResponse,
                chunk=ChatCompletionChunk,
                example=chat,
                stream_example={**chat, "stream": True},
                more_examples={
                    "tools": {
                        "summary": "a forced tool call",
                        "value": {**chat, **_TOOL_EXAMPLE, "max_tokens": 48},
                    }
                },
            )
        },
        f"{OPENAI_PREFIX}/models": {
            "get": {
                "operationId": "listModels",
                "summary": "The deployed model, as the OpenAI model list",
                "responses": {
                    "200": {"description": "The model list", "content": _json(_ref(ModelList))},
                    **_errors("405", "500"),
                },
            }
        },
    }


def _native_operation(operation_id: str, summary: str, *, extra: dict[str, Any]) -> dict[str, Any]:
    records = _ref(NativeRecords)
    example = [{"text": "tell me a short story"}]
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": "Generation uses the model's configured defaults.",
        **extra,
        "requestBody": {
            "required": True,
            "content": {
                "application/json; format=pandas-records": {
                    "schema": records,
                    "examples": {"basic": {"summary": "one prompt", "value": example}},
                },
                "application/json": {
                    "schema": records,
                    "examples": {"basic": {"summary": "one prompt", "value": example}},
                },
            },
        },
        "responses": {
            "200": {
                "description": "One record per input record",
                "content": _json(_ref(NativeOutputs)),
            },
            **_errors("400", "405", "408", "413", "429", "500", "503", "504"),
        },
    }


def _native_paths(pipeline: str) -> dict[str, Any]:
    parameter = {
        "name": "pipeline",
        "in": "path",
        "required": True,
        "description": "This box's pipeline name; any other name is a 404",
        "schema": {"type": "string", "enum": [pipeline]},
    }
    named = _native_operation(
        "pipelineInfer",
        f"Native inference on pipeline {pipeline}",
        extra={"parameters": [parameter]},
    )
    named["responses"].update(_errors("404"))
    return {
        "/infer": {"post": _native_operation("infer", "Native inference", extra={})},
        "/pipelines/{pipeline}": {"post": named},
    }


def _get(operation_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "responses": {**responses, **_errors("405", "500")},
        }
    }


def _post_json(
    operation_id: str,
    summary: str,
    *,
    request: dict[str, Any],
    example: dict[str, Any],
    response: type[BaseModel],
) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": request,
                        "examples": {"basic": {"summary": summary, "value": example}},
                    }
                },
            },
            "responses": {
                "200": {"description": summary, "content": _json(_ref(response))},
                **_errors("400", "405", "413", "500", "503"),
            },
        }
    }


def _put_active_model() -> dict[str, Any]:
    summary = "Swap the serving model without dropping a request (answers once it serves)"
    return {
        "put": {
            "operationId": "setActiveModel",
            "summary": summary,
            "description": (
                "Loads the model beside the serving one, runs its canary, then routes new "
                "requests to it; requests in flight finish on the old model. Needs the "
                "bearer token; refused (403) when none is configured unless "
                "model_swap_access = 'open'."
            ),
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": _ref(ActiveModelRequest),
                        "examples": {"basic": {"summary": summary, "value": {"model": "my-model"}}},
                    }
                },
            },
            "responses": {
                "200": {"description": "The model serves", "content": _json(_ref(ModelSwapResult))},
                **_errors("400", "403", "404", "405", "409", "413", "422", "500"),
            },
        }
    }


def _tokenizer_paths() -> dict[str, Any]:
    return {
        "/tokenize": _post_json(
            "tokenize",
            "Token ids of a prompt, or of chat messages through the chat template",
            request={"anyOf": [_ref(TokenizePromptRequest), _ref(TokenizeChatRequest)]},
            example={"messages": [{"role": "user", "content": "hello"}]},
            response=TokenizeResponse,
        ),
        "/detokenize": _post_json(
            "detokenize",
            "The text of token ids",
            request=_ref(DetokenizeRequest),
            example={"tokens": [1, 2, 3]},
            response=DetokenizeResponse,
        ),
    }


def _edge_paths(logs_access: str) -> dict[str, Any]:
    example = {"summary": "the latest five records", "value": {"limit": 5}}
    paths = {
        **_tokenizer_paths(),
        "/pipelines": _get(
            "listPipelines",
            "This box's pipeline and its status",
            {"200": {"description": "Pipelines", "content": _json(_ref(PipelineList))}},
        ),
        "/models": _get(
            "listDeployedModels",
            "The deployed model: name, weights digest, status, version",
            {"200": {"description": "Models", "content": _json(_ref(DeployedModelList))}},
        ),
        ACTIVE_MODEL_PATH: _put_active_model(),
        "/healthz": _get(
            "health",
            "Liveness: 200 while the process serves HTTP",
            {"200": {"description": "Alive", "content": _json(_ref(Health))}},
        ),
        "/readyz": _get(
            "readiness",
            "Readiness: 200 once the model is loaded",
            {
                "200": {"description": "Ready", "content": _json(_ref(Readiness))},
                "503": {
                    "description": "Not ready yet, with the reason",
                    "headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}},
                    "content": _json(_ref(Readiness)),
                },
            },
        ),
        "/metrics": _get(
            "metrics",
            "Prometheus metrics (ttft, tps, requests, tokens, the inference log)",
            {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        ),
        SPEC_PATH: _get(
            "openapiSpec",
            "This document",
            {
                "200": {
                    "description": "OpenAPI 3.1.1, YAML",
                    # YAML is a JSON superset: clients parse it to this one object.
                    "content": {YAML_CONTENT_TYPE: {"schema": {"type": "object"}}},
                }
            },
        ),
        LOGS_PATH: {
            "get": {
                "operationId": "recentLogs",
                "summary": "Recent inference log records, newest first",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 1000,
                            "default": 100,
                        },
                    },
                    {
                        "name": "since",
                        "in": "query",
                        "required": False,
                        "description": "A record id: only records after it (exclusive)",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "before",
                        "in": "query",
                        "required": False,
                        "description": "A record id: only records before it (the next page)",
                        "schema": {"type": "string"},
                    },
                    *(
                        {
                            "name": name,
                            "in": "query",
                            "required": False,
                            "description": f"Epoch milliseconds: records accepted {when}",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 10**15 - 1},
                        }
                        for name, when in (("start", "at or after"), ("end", "before"))
                    ),
                ],
                "responses": {
                    "200": {"description": "A page of records", "content": _json(_ref(LogPage))},
                    **_errors("400", "404", "405", "500"),
                },
            },
            "post": {
                "operationId": "queryLogs",
                "summary": "Inference log records as pandas-records, oldest first",
                "description": "The body filters the records; `{}` asks for the latest 100.",
                "requestBody": {
                    "required": True,
                    "content": {
                        media: {"schema": _ref(LogQuery), "examples": {"basic": example}}
                        for media in ("application/json; format=pandas-records", "application/json")
                    },
                },
                "responses": {
                    "200": {"description": "The records", "content": _json(_ref(LogRecords))},
                    **_errors("400", "404", "405", "408", "413", "500"),
                },
            },
        },
    }
    if logs_access == "off":  # not served: not in the document either
        del paths[LOGS_PATH]
    return paths


def _duration_parameter(name: str) -> dict[str, Any]:
    field = StatsQuery.model_fields[name]
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": field.description,
        "schema": {"type": "string", "pattern": DURATION_PATTERN},
    }


def _static(operation_id: str, summary: str, media_type: str) -> dict[str, Any]:
    return _get(
        operation_id,
        summary,
        {
            "200": {
                "description": summary,
                "content": {media_type: {"schema": {"type": "string"}}},
            },
            "304": {"description": "Not modified since the ETag given in If-None-Match"},
        },
    )


def _dashboard_paths() -> dict[str, Any]:
    paths = {
        path: _static(
            "dashboard" if path == "/dashboard" else "home",
            "The box's own page: charts, state, latest inferences",
            "text/html",
        )
        for path in DASHBOARD_PAGES
    }
    for path, name in DASHBOARD_ASSETS.items():
        kind = "script" if name.endswith(".js") else "stylesheet"
        media = "text/javascript" if kind == "script" else "text/css"
        operation_id = "dashboardScript" if kind == "script" else "dashboardStylesheet"
        paths[path] = _static(operation_id, f"The page's {kind}", media)
    stats = _get(
        "stats",
        "ttft and tps (median, p95, count) and requests per time bucket, from the inference log",
        {
            "200": {"description": "The series", "content": _json(_ref(StatsSeries))},
            **_errors("400", "404"),
        },
    )
    stats["get"]["parameters"] = [_duration_parameter("window"), _duration_parameter("step")]
    paths["/stats"] = stats
    paths["/status"] = _get(
        "status",
        "Readiness, model, engine configuration, queue, inference log and upload state",
        {"200": {"description": "The state now", "content": _json(_ref(BoxStatus))}},
    )
    return paths


def build_spec(settings: Settings, manifest: ModelManifest, *, server_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1.1 document of what this deployment serves at ``server_url``."""
    enabled = openai_enabled(settings, manifest)
    paths = _openai_paths(manifest.name) if enabled else _native_paths(settings.pipeline)
    if enabled and manifest.embedding.enabled:
        paths.update(_embeddings_path(manifest.name))
    paths.update(_edge_paths(settings.effective_logs_access))
    paths.update(_dashboard_paths())
    _, schemas = _component_schemas()
    components: dict[str, Any] = {
        "schemas": copy.deepcopy(schemas),
        "responses": copy.deepcopy(_ERROR_RESPONSES),
        "headers": {
            "RetryAfter": {
                "description": "Seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 0},
            }
        },
    }
    spec: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": f"{settings.pipeline} inference endpoints",
            "version": _package_version(),
            "description": (
                f"Pipeline `{settings.pipeline}` serving `{manifest.name}` (version "
                f"{manifest.version}) with OpenAI compatibility "
                f"{'on' if enabled else 'off'}."
            ),
        },
        "servers": [{"url": server_url.rstrip("/")}],
        "paths": paths,
        "components": components,
    }
    if settings.auth_token:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearerAuth": []}]
        for path, item in paths.items():
            for operation in item.values():
                if path in open_paths(settings.dashboard_access) or (
                    path in LOG_PATHS and settings.effective_logs_access == "open"
                ):
                    # Health, metrics, this document, (by default) the page and an open log.
                    operation["security"] = []
                else:
                    operation["responses"].update(_errors("401"))
    return spec


def spec_yaml(settings: Settings, manifest: ModelManifest, *, server_url: str) -> str:
    """``build_spec`` as YAML, keys in document order."""
    spec = build_spec(settings, manifest, server_url=server_url)
    text: str = yaml.dump(spec, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True, width=100)
    return text


class _PlainDumper(yaml.SafeDumper):
    """Writes shared sub-trees out in full: anchors and aliases confuse some OpenAPI tools."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
