"""Bad input gets its CONTRACT.md section 4 status and envelope, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edge_agent.engine.backend_choice import BackendChoice, build_backend
from edge_agent.manifest import ModelManifest
from edge_agent.server.app import create_app, wait_until_loaded
from tests.conftest import RecordingSink, make_settings

COMPLETIONS = "/infer/openai/v1/completions"
CHAT = "/infer/openai/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def assert_envelope(body: dict[str, Any], error_type: str) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    # A context overflow adds the numbers behind it, for clients that trim history.
    numbers = {"n_prompt_tokens", "n_ctx"} if error["code"] == "context_length_exceeded" else set()
    assert set(error) == {"message", "type", "param", "code"} | numbers
    assert error["type"] == error_type and error["message"]
    return error


BAD_REQUESTS = [
    # (name, path, body, param, code)
    ("invalid JSON", COMPLETIONS, b'{"prompt": "x", ', None, None),
    ("not an object", COMPLETIONS, b'["prompt"]', None, None),
    ("missing prompt", COMPLETIONS, b'{"max_tokens": 3}', "prompt", None),
    ("missing messages", CHAT, b'{"max_tokens": 3}', "messages", None),
    (
        "string temperature",
        COMPLETIONS,
        b'{"prompt": "x", "temperature": "hot"}',
        "temperature",
        None,
    ),
    ("bool max_tokens", COMPLETIONS, b'{"prompt": "x", "max_tokens": true}', "max_tokens", None),
    ("negative max_tokens", COMPLETIONS, b'{"prompt": "x", "max_tokens": -1}', "max_tokens", None),
    ("zero n", COMPLETIONS, b'{"prompt": "x", "n": 0}', "n", None),
    (
        "top_p above one",
        CHAT,
        b'{"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}',
        "top_p",
        None,
    ),
    ("empty messages", CHAT, b'{"messages": []}', "messages", None),
    (
        "unknown role",
        CHAT,
        b'{"messages": [{"role": "wizard", "content": "x"}]}',
        "messages[0].role",
        None,
    ),
    (
        "image content",
        CHAT,
        b'{"messages": [{"role": "user", "content": [{"type": "image_url", '
        b'"image_url": {"url": "x"}}]}]}',
        "messages[0].content",
        None,
    ),
    (
        "huge max_tokens",
        COMPLETIONS,
        b'{"prompt": "x", "max_tokens": 1000000000}',
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "bad logit_bias key",
        COMPLETIONS,
        b'{"prompt": "x", "logit_bias": {"abc": 1}}',
        "logit_bias",
        None,
    ),
    (
        "logit_bias outside vocabulary",
        COMPLETIONS,
        b'{"prompt": "x", "logit_bias": {"99999999": 1}}',
        "logit_bias",
        None,
    ),
    (
        "legacy functions",
        CHAT,
        b'{"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}',
        "functions",
        None,
    ),
    (
        "tool_choice without tools",
        CHAT,
        b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}',
        "tool_choice",
        None,
    ),
    (
        "tool_choice naming no offered tool",
        CHAT,
        b'{"messages": [{"role": "user", "content": "x"}], '
        b'"tools": [{"type": "function", "function": {"name": "f"}}], '
        b'"tool_choice": {"type": "function", "function": {"name": "g"}}}',
        "tool_choice",
        None,
    ),
    (
        "tool message without tool_call_id",
        CHAT,
        b'{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]}',
        "messages[1].tool_call_id",
        None,
    ),
    (
        "forced call with a schema no grammar can enforce",
        CHAT,
        b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required", '
        b'"tools": [{"type": "function", "function": {"name": "f", "parameters": {"": null}}}]}',
        "tools",
        None,
    ),
    (
        "tool name with a space",
        CHAT,
        b'{"messages": [{"role": "user", "content": "x"}], '
        b'"tools": [{"type": "function", "function": {"name": "a b"}}]}',
        "tools[0].function.name",
        None,
    ),
    ("suffix", COMPLETIONS, b'{"prompt": "x", "suffix": "y"}', "suffix", None),
    (
        "stream_options without stream",
        COMPLETIONS,
        b'{"prompt": "x", "stream_options": {"include_usage": true}}',
        "stream_options",
        None,
    ),
    ("token id outside vocabulary", COMPLETIONS, b'{"prompt": [99999999]}', "prompt", None),
    # Deeper than any JSON parser recurses: the log record keeps it as text, never a 500.
    ("100,000 nested arrays", CHAT, b"[" * 100_000 + b"]" * 100_000, None, None),
    ("empty prompt list", COMPLETIONS, b'{"prompt": []}', "prompt", None),
]


@pytest.mark.parametrize(
    ("path", "raw", "param", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_request_gets_400_with_the_param(
    client: Any, path: str, raw: bytes, param: str | None, code: str | None
) -> None:
    response = await client.post(path, data=raw, headers={"Content-Type": "application/json"})
    assert response.status == 400
    error = assert_envelope(await response.json(), "invalid_request_error")
    assert error["param"] == param
    assert error["code"] == code
    # ...and the daemon goes on serving.
    after = await client.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 2})
    assert after.status == 200


async def test_a_prompt_past_the_context_window(make_client: Any) -> None:
    client = await make_client(context_size=256)
    response = await client.post(COMPLETIONS, json={"prompt": "hello " * 400, "max_tokens": 4})
    assert response.status == 400
    error = assert_envelope(await response.json(), "invalid_request_error")
    assert error["code"] == "context_length_exceeded"
    assert error["n_ctx"] == 256
    assert error["n_prompt_tokens"] > 256


async def test_max_tokens_absent_is_capped_by_the_window(make_client: Any) -> None:
    client = await make_client(context_size=128)
    prompt = "hello " * 100  # about 100 tokens of the 128
    body = await (await client.post(COMPLETIONS, json={"prompt": prompt, "temperature": 0})).json()
    usage = body["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 128


async def test_a_body_over_the_limit_is_413(client: Any) -> None:
    huge = b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    response = await client.post(COMPLETIONS, data=huge)
    assert response.status == 413
    assert_envelope(await response.json(), "invalid_request_error")
    assert (await client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 1})).status == 200


async def test_a_wrong_method_is_405_with_allow(client: Any) -> None:
    response = await client.get(COMPLETIONS)
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert_envelope(await response.json(), "invalid_request_error")


async def test_an_unknown_path_is_404(client: Any) -> None:
    response = await client.post("/infer/openai/v1/audio/speech", json={})
    assert response.status == 404
    assert_envelope(await response.json(), "invalid_request_error")


async def test_openai_paths_refuse_when_openai_is_off(make_client: Any) -> None:
    client = await make_client(openai_enabled=False)
    for path in (COMPLETIONS, CHAT):
        response = await client.post(path, json={"prompt": "x", "messages": USER})
        assert response.status == 400
        error = assert_envelope(await response.json(), "invalid_request_error")
        assert error["message"].startswith(
            "Inference failed. Please apply the appropriate OpenAI configurations to the "
            "models deployed in this pipeline."
        )


async def test_native_infer_refuses_when_openai_is_on(client: Any) -> None:
    response = await client.post("/infer", json=[{"text": "hello"}])
    assert response.status == 400
    error = assert_envelope(await response.json(), "invalid_request_error")
    assert error["message"].startswith(
        "Inference failed. Please apply the appropriate OpenAI extensions to the inference "
        "endpoint."
    )


async def test_model_loading_is_503_with_retry_after(make_client: Any) -> None:
    gate = asyncio.Event()
    client = await make_client(wait=False, load_gate=gate)
    ready = await client.get("/readyz")
    assert ready.status == 503 and ready.headers["Retry-After"]
    response = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 1})
    assert response.status == 503 and response.headers["Retry-After"]
    error = assert_envelope(await response.json(), "server_error")
    assert error["code"] == "model_not_ready"
    models = await (await client.get("/models")).json()
    assert models["models"][0]["status"] == "Loading"
    gate.set()  # the model loads now; the same daemon then serves
    await wait_until_loaded(client.app)
    assert (await client.get("/readyz")).status == 200
    assert (await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 1})).status == 200


async def test_queue_full_is_429_with_retry_after(make_client: Any) -> None:
    client = await make_client(parallel=1, max_queue=0)
    no_end = {"0": -100, "1": -100, "2": -100}  # end-of-text tokens: the slot stays busy
    long_body = {
        "prompt": "Tell me a story.",
        "max_tokens": 400,
        "stream": True,
        "logit_bias": no_end,
    }
    running = await client.post(COMPLETIONS, json=long_body)
    await running.content.readline()  # the first token is out: the only slot is busy
    response = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 1})
    assert response.status == 429
    assert int(response.headers["Retry-After"]) > 0
    assert_envelope(await response.json(), "rate_limit_error")
    running.close()


async def test_bearer_token_guards_inference_not_health(make_client: Any) -> None:
    client = await make_client(auth_token="s3cret")
    body = {"prompt": "Hi", "max_tokens": 1}
    missing = await client.post(COMPLETIONS, json=body)
    assert missing.status == 401
    assert_envelope(await missing.json(), "authentication_error")
    wrong = await client.post(COMPLETIONS, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    right = await client.post(COMPLETIONS, json=body, headers={"Authorization": "Bearer s3cret"})
    assert right.status == 200
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_errors_are_logged_and_earlier_records_kept(make_client: Any) -> None:
    sink = RecordingSink()
    client = await make_client(records=sink)
    await client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 1})
    await client.post(COMPLETIONS, data=b"{nope")
    await asyncio.sleep(0)
    assert [r["status"] for r in sink.records] == ["ok", "error"]
    assert sink.records[1]["in"] == "{nope"


async def test_weights_the_manifest_does_not_name_are_not_served(
    aiohttp_client: Any, manifest: ModelManifest, tmp_path: Path
) -> None:
    assert manifest.gguf is not None
    wrong = manifest.model_copy(
        update={"gguf": manifest.gguf.model_copy(update={"sha256": "0" * 64})}
    )
    settings = make_settings(tmp_path)
    backend = build_backend(BackendChoice("llamacpp", "test"), wrong, settings)
    app = create_app(settings, wrong, backend, records=RecordingSink())
    client = await aiohttp_client(app)
    await wait_until_loaded(app)
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "sha256" in (await ready.json())["reason"]
    models = await (await client.get("/models")).json()
    assert models["models"][0]["status"] == "Error"
    response = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 1})
    assert response.status == 503
    error = assert_envelope(await response.json(), "server_error")
    assert error["code"] == "model_not_ready" and "manifest says" in error["message"]
