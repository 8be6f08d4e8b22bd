"""Schemathesis drives a real daemon from the deployment's own OpenAPI document.

Every operation gets the document's examples plus a bounded number of generated
requests, valid and invalid: no answer may be a 5xx, every answer must match the
document (status, content type, headers, body schema), and the daemon must still
serve afterwards. Generation is bounded (``max_tokens`` and ``n`` capped on the way
out) so each call takes a fraction of a second on the 135M model.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import hypothesis
import jsonschema
import pytest
import schemathesis
from schemathesis.checks import CheckFunction
from schemathesis.specs.openapi import checks as openapi_checks

from edge_agent.config import Settings
from edge_agent.manifest import ModelManifest, load_manifest
from edge_agent.openapi import build_spec
from tests.conftest import Daemon

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
COMPLETIONS = "/infer/openai/v1/completions"
CHAT = "/infer/openai/v1/chat/completions"
MAX_TOKENS = 4
MAX_CHOICES = 2
MAX_INPUTS = 4
EXAMPLES_PER_OPERATION = 20
TOKEN = "fuzz-token"


def native_manifest() -> str:
    """The default model with OpenAI off and short native generations (fast /infer)."""
    gguf = load_manifest(MODEL).gguf
    assert gguf is not None and gguf.package is not None
    return (
        f'name = "{MODEL}"\n'
        f'[gguf]\npackage = "{gguf.package}"\nfile = "{gguf.file}"\nsha256 = "{gguf.sha256}"\n'
        f"[openai]\nenabled = false\n"
        f"[openai.completion_config]\nmax_tokens = {MAX_TOKENS}\n"
    )


def _bound(body: Any) -> None:
    """Keep generated inference requests cheap without changing what they test."""
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        # Only valid values are capped: an invalid one must still reach the validator.
        if type(value) is int and value > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS
    for field in ("n", "best_of"):
        if type(body.get(field)) is int and body[field] > MAX_CHOICES:
            body[field] = MAX_CHOICES
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > MAX_CHOICES:
        body["prompt"] = prompt[:MAX_CHOICES]


def _bound_embedding(body: Any) -> None:
    """A few inputs per request; an empty or invalid list still reaches the validator."""
    inputs = body.get("input") if isinstance(body, dict) else None
    if isinstance(inputs, list) and len(inputs) > MAX_INPUTS:
        body["input"] = inputs[:MAX_INPUTS]


def _schema(settings: Settings) -> Any:
    # Built at import, as parametrize needs it: the paths do not depend on the daemon's
    # address, which each call gets as its base URL.
    spec = build_spec(settings, load_manifest(MODEL), server_url="http://127.0.0.1")
    config: dict[str, Any] = {
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
        # Servers ignore query parameters they do not know, as aiohttp apps do.
        "generation": {"max-examples": EXAMPLES_PER_OPERATION, "allow-extra-parameters": False},
    }
    if settings.auth_token:
        # Given as the scheme's credentials, so negative cases can leave it out (expect 401).
        config["auth"] = {"openapi": {"bearerAuth": {"bearer": settings.auth_token}}}
    return schemathesis.openapi.from_dict(spec, config=schemathesis.Config.from_dict(config))


openai_schema = _schema(Settings())
native_schema = _schema(Settings(openai_enabled=False, auth_token=TOKEN))

# positive_data_acceptance would need every pydantic validator and cross-field rule
# expressed in JSON Schema, and a prompt's length in tokens cannot be: the gaps that can
# be are pinned one by one in test_the_document_refuses_what_the_server_refuses.
EXCLUDED: list[CheckFunction] = [openapi_checks.positive_data_acceptance]
HYPOTHESIS = hypothesis.settings(
    deadline=None,
    derandomize=True,  # the same requests on every run: CI failures reproduce
    suppress_health_check=list(hypothesis.HealthCheck),
)


@pytest.fixture(scope="module")
def native_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """OpenAI compatibility off, a bearer token, and a small default max_tokens."""
    state = tmp_path_factory.mktemp("native")
    manifest = state / "native.toml"
    manifest.write_text(native_manifest())
    server = Daemon(
        state,
        "--model",
        str(manifest),
        env={"EDGE_AGENT_OPENAI_ENABLED": "false", "EDGE_AGENT_AUTH_TOKEN": TOKEN},
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _prepare(case: schemathesis.Case) -> None:
    if case.path.endswith("/embeddings"):
        _bound_embedding(case.body)
    else:
        _bound(case.body)


@openai_schema.parametrize()
@HYPOTHESIS
def test_openai_deployment_conforms_to_its_document(
    case: schemathesis.Case, daemon: Daemon
) -> None:
    _prepare(case)
    case.call_and_validate(base_url=daemon.url, timeout=60, excluded_checks=EXCLUDED)


@native_schema.parametrize()
@HYPOTHESIS
def test_native_deployment_with_token_conforms_to_its_document(
    case: schemathesis.Case, native_daemon: Daemon
) -> None:
    _prepare(case)
    case.call_and_validate(base_url=native_daemon.url, timeout=60, excluded_checks=EXCLUDED)


def test_daemon_still_serves_after_fuzzing(daemon: Daemon) -> None:
    with urllib.request.urlopen(daemon.url + "/readyz", timeout=10) as response:
        assert response.status == 200
    body = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
    request = urllib.request.Request(
        daemon.url + "/infer/openai/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


# --- regression tests for what the sweep found ----------------------------------------------


@pytest.mark.parametrize(
    "penalty", [("repetition_penalty", 1.3), ("frequency_penalty", 0.5), ("presence_penalty", 0.5)]
)
def test_penalties_are_applied_not_a_500(daemon: Daemon, penalty: tuple[str, float]) -> None:
    name, value = penalty
    status, answer = daemon.post_json(COMPLETIONS, {"prompt": "hi", "max_tokens": 4, name: value})
    assert status == 200, answer
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


def _request_schema_accepts(spec: dict[str, Any], component: str, body: Any) -> bool:
    # The spec's own components resolve "#/components/..." against this root document.
    root = {"$ref": f"#/components/schemas/{component}", "components": spec["components"]}
    return jsonschema.Draft202012Validator(root).is_valid(body)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"prompt": "hi", "max_tokens": 0}, id="max_tokens-zero"),
        pytest.param({"prompt": "hi", "temperature": 3}, id="temperature-over-2"),
        pytest.param({"max_tokens": 4}, id="no-prompt"),
        pytest.param({"prompt": "", "max_tokens": 4}, id="empty-prompt"),
        pytest.param({"prompt": [[]], "max_tokens": 4}, id="empty-token-list"),
        pytest.param({"prompt": "hi", "stop": ""}, id="empty-stop"),
        pytest.param({"prompt": "hi", "stop": list("abcdefghijklmnopq")}, id="17-stops"),
        pytest.param({"prompt": "hi", "logit_bias": {"abc": 1}}, id="bias-key"),
        pytest.param({"prompt": "hi", "logit_bias": {"1": 101}}, id="bias-value"),
        pytest.param(
            {"prompt": "hi", "response_format": {"type": "json_schema"}},
            id="json-schema-without-schema",
        ),
    ],
)
def test_the_document_refuses_what_the_server_refuses(
    daemon: Daemon, manifest: ModelManifest, body: dict[str, Any]
) -> None:
    status, answer = daemon.post_json(COMPLETIONS, body)
    assert status == 400, answer
    spec = build_spec(Settings(), manifest, server_url=daemon.url)
    assert not _request_schema_accepts(spec, "CompletionRequest", body)


EMBEDDINGS = "/infer/openai/v1/embeddings"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"input": ""}, id="empty-input"),
        pytest.param({"input": []}, id="no-inputs"),
        pytest.param({"input": [[]]}, id="empty-token-list"),
        pytest.param({"input": [-1]}, id="negative-token"),
        pytest.param({"input": ["a"] * 2049}, id="2049-inputs"),
        pytest.param({"input": "hi", "dimensions": 0}, id="dimensions-zero"),
        pytest.param({"input": "hi", "encoding_format": "int8"}, id="encoding-format"),
    ],
)
def test_the_document_refuses_the_embeddings_the_server_refuses(
    daemon: Daemon, manifest: ModelManifest, body: dict[str, Any]
) -> None:
    status, answer = daemon.post_json(EMBEDDINGS, body)
    assert status == 400, answer
    spec = build_spec(Settings(), manifest, server_url=daemon.url)
    assert not _request_schema_accepts(spec, "EmbeddingsRequest", body)
