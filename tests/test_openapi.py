"""The deployment's OpenAPI 3.1.1 document: valid, exactly the served paths, usable as is."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from edge_agent.cli import add_api_spec_command
from edge_agent.config import Settings
from edge_agent.engine.backends.llamacpp import LlamaCppBackend
from edge_agent.manifest import ModelManifest
from edge_agent.openapi import build_spec, spec_yaml
from edge_agent.protocol.edge import OPENAI_PREFIX
from edge_agent.server.app import create_app, wait_until_loaded
from tests.conftest import Daemon, make_settings

EDGE_PATHS = {
    "/pipelines",
    "/models",
    "/models/active",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.yaml",
    "/logs",
    "/tokenize",
    "/detokenize",
    "/",
    "/dashboard",
    "/dashboard/app.js",
    "/dashboard/app.css",
    "/stats",
    "/status",
}
OPENAI_PATHS = {
    f"{OPENAI_PREFIX}/completions",
    f"{OPENAI_PREFIX}/chat/completions",
    f"{OPENAI_PREFIX}/models",
    f"{OPENAI_PREFIX}/embeddings",
}
NATIVE_PATHS = {"/infer", "/pipelines/{pipeline}"}
URL = "http://edge-box:8080"


def spec_for(manifest: ModelManifest, **settings: Any) -> dict[str, Any]:
    return build_spec(Settings(**settings), manifest, server_url=URL)


@pytest.mark.parametrize("openai_enabled", [True, False])
@pytest.mark.parametrize("auth_token", [None, "secret"])
def test_the_document_is_valid_openapi_3_1_1(
    manifest: ModelManifest, openai_enabled: bool, auth_token: str | None
) -> None:
    spec = spec_for(manifest, openai_enabled=openai_enabled, auth_token=auth_token)
    assert spec["openapi"] == "3.1.1"
    validate(spec)
    # What goes over the wire is YAML: it must read back as the same document.
    text = spec_yaml(Settings(openai_enabled=openai_enabled), manifest, server_url=URL)
    validate(yaml.safe_load(text))


def test_openai_on_lists_the_openai_paths_and_no_native_ones(manifest: ModelManifest) -> None:
    assert set(spec_for(manifest, openai_enabled=True)["paths"]) == OPENAI_PATHS | EDGE_PATHS


def test_openai_off_lists_the_native_paths_and_no_openai_ones(manifest: ModelManifest) -> None:
    assert set(spec_for(manifest, openai_enabled=False)["paths"]) == NATIVE_PATHS | EDGE_PATHS


def test_the_manifest_decides_when_the_settings_do_not(manifest: ModelManifest) -> None:
    off = manifest.model_copy(
        update={"openai": manifest.openai.model_copy(update={"enabled": False})}
    )
    assert set(spec_for(off)["paths"]) == NATIVE_PATHS | EDGE_PATHS
    assert set(spec_for(off, openai_enabled=True)["paths"]) == OPENAI_PATHS | EDGE_PATHS


def test_a_model_that_does_not_embed_has_no_embeddings_path(manifest: ModelManifest) -> None:
    no_embeddings = manifest.model_copy(
        update={"embedding": manifest.embedding.model_copy(update={"enabled": False})}
    )
    paths = set(spec_for(no_embeddings)["paths"])
    assert paths == (OPENAI_PATHS - {f"{OPENAI_PREFIX}/embeddings"}) | EDGE_PATHS


def test_the_embeddings_schemas_are_the_protocol_models(manifest: ModelManifest) -> None:
    from edge_agent.protocol.embeddings import EmbeddingsRequest

    spec = spec_for(manifest)
    schemas = spec["components"]["schemas"]
    generated = EmbeddingsRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    generated.pop("$defs", None)
    assert schemas["EmbeddingsRequest"] == generated
    answer = spec["paths"][f"{OPENAI_PREFIX}/embeddings"]["post"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbeddingsResponse"
    }


def test_the_server_url_is_the_deployment(manifest: ModelManifest) -> None:
    assert spec_for(manifest)["servers"] == [{"url": URL}]


def test_the_bearer_scheme_appears_only_with_a_token(manifest: ModelManifest) -> None:
    open_spec = spec_for(manifest)
    assert "securitySchemes" not in open_spec["components"]
    assert "security" not in open_spec
    assert not any("401" in op["responses"] for op in _operations(open_spec))

    spec = spec_for(manifest, auth_token="secret")
    assert spec["components"]["securitySchemes"] == {
        "bearerAuth": {"type": "http", "scheme": "bearer"}
    }
    assert spec["security"] == [{"bearerAuth": []}]
    # Health, metrics and the document stay open, as the middleware keeps them.
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.yaml"):
        assert spec["paths"][path]["get"]["security"] == []
    completions = spec["paths"][f"{OPENAI_PREFIX}/completions"]["post"]
    assert "security" not in completions and "401" in completions["responses"]


def test_the_page_is_open_beside_a_token_unless_set_behind_it(manifest: ModelManifest) -> None:
    spec = spec_for(manifest, auth_token="secret")
    for path in ("/", "/dashboard/app.js", "/stats", "/status"):
        assert spec["paths"][path]["get"]["security"] == []
    guarded = spec_for(manifest, auth_token="secret", dashboard_access="token")["paths"]
    assert guarded["/"]["get"]["security"] == []  # the page itself carries no data
    for path in ("/stats", "/status"):
        assert "security" not in guarded[path]["get"]
        assert "401" in guarded[path]["get"]["responses"]


def test_schemas_are_the_protocol_models(manifest: ModelManifest) -> None:
    from edge_agent.protocol.openai import CompletionRequest

    schemas = spec_for(manifest)["components"]["schemas"]
    generated = CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    generated.pop("$defs", None)
    assert schemas["CompletionRequest"] == generated


def test_every_error_answer_is_the_envelope(manifest: ModelManifest) -> None:
    for settings in ({"openai_enabled": True}, {"openai_enabled": False, "auth_token": "t"}):
        spec = spec_for(manifest, **settings)
        for operation in _operations(spec):
            for status, response in operation["responses"].items():
                if int(status) >= 400 and operation["operationId"] != "readiness":
                    ref = response["$ref"].rsplit("/", 1)[-1]
                    schema = spec["components"]["responses"][ref]["content"]["application/json"]
                    assert schema["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


def test_streaming_is_described_as_an_event_stream(manifest: ModelManifest) -> None:
    spec = spec_for(manifest)
    for path in ("completions", "chat/completions"):
        content = spec["paths"][f"{OPENAI_PREFIX}/{path}"]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        data = content["text/event-stream"]["schema"]["properties"]["data"]
        assert {"type": "string", "const": "[DONE]"} in data["anyOf"]


def test_every_inference_path_has_an_example_body(manifest: ModelManifest) -> None:
    for enabled in (True, False):
        spec = spec_for(manifest, openai_enabled=enabled)
        for operation in _operations(spec):
            if operation["operationId"] in ("listModels",) or "requestBody" not in operation:
                continue
            for media in operation["requestBody"]["content"].values():
                assert media["examples"]["basic"]["value"]


def test_the_api_spec_command_writes_the_yaml(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_api_spec_command(parser.add_subparsers(dest="command"))
    output = tmp_path / "edge-llm.yaml"
    args = parser.parse_args(["api-spec", "-o", str(output), "--server-url", URL])
    assert args.func(args) == 0
    spec = yaml.safe_load(output.read_text())
    validate(spec)
    assert spec["servers"] == [{"url": URL}]


# --- against a live daemon ----------------------------------------------------------------


@pytest.mark.slow
def test_the_example_bodies_succeed_against_the_daemon(
    daemon: Daemon, manifest: ModelManifest
) -> None:
    spec = build_spec(Settings(), manifest, server_url=daemon.url)
    server = spec["servers"][0]["url"]
    for path, item in spec["paths"].items():
        operation = item.get("post")
        if operation is None:
            continue
        media = operation["requestBody"]["content"]["application/json"]
        for example in media["examples"].values():
            request = urllib.request.Request(
                server + path,
                data=json.dumps(example["value"]).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                assert response.status == 200
                body = response.read()
            assert (
                body.startswith(b"data: ") if example["value"].get("stream") else json.loads(body)
            )


@pytest.fixture
async def spec_client(
    aiohttp_client: Any, manifest: ModelManifest, tmp_path: Path
) -> Callable[..., Any]:
    """An in-process app with GET /openapi.yaml registered before it starts."""

    async def start(**overrides: Any) -> TestClient[web.Request, web.Application]:
        settings = make_settings(tmp_path, **overrides)
        backend = LlamaCppBackend(
            manifest.gguf_path(), context_length=settings.context_size or manifest.context_length
        )
        app = create_app(settings, manifest, backend)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        await wait_until_loaded(app)
        return client

    return start


@pytest.mark.parametrize("openai_enabled", [True, False])
async def test_the_daemon_serves_its_own_document(
    spec_client: Callable[..., Any], openai_enabled: bool
) -> None:
    client = await spec_client(openai_enabled=openai_enabled, auth_token="secret")
    # Open like /healthz: a developer fetches it before having a token.
    response = await client.get("/openapi.yaml")
    assert response.status == 200
    assert response.content_type == "application/yaml"
    spec = yaml.safe_load(await response.text())
    validate(spec)
    assert spec["servers"] == [{"url": str(client.make_url("")).rstrip("/")}]
    expected = (OPENAI_PATHS if openai_enabled else NATIVE_PATHS) | EDGE_PATHS
    assert set(spec["paths"]) == expected
    assert "bearerAuth" in spec["components"]["securitySchemes"]


def _operations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [operation for item in spec["paths"].values() for operation in item.values()]
