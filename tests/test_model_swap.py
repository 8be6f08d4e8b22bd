"""A model swapped on a live box: streams in flight finish, nothing 5xx, bad candidates refused.

Two real models: the default one and the same weights requantized to Q4_0 with llama.cpp's
quantize API (tests/second_model.py): another file, sha256, version and greedy text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.manifest import ModelManifest, sha256_of
from tests.second_model import SECOND_NAME, make_second_model, write_manifest

TOKEN = "swap-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NO_END = {"0": -100, "1": -100, "2": -100}  # end-of-text tokens away: runs to max_tokens
STREAM_TOKENS = 48


@pytest.fixture(scope="module")
def second_manifest(tmp_path_factory: pytest.TempPathFactory, manifest: ModelManifest) -> Path:
    return make_second_model(tmp_path_factory.mktemp("second-model"), manifest)


def _completion(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "max_tokens": STREAM_TOKENS,
        "temperature": 0,
        "logit_bias": NO_END,
        **extra,
    }


async def _stream(client: Any, prompt: str, started: asyncio.Event) -> dict[str, Any]:
    """One streamed completion: its status, text, model and finish reason."""
    body = _completion(prompt, stream=True, stream_options={"include_usage": True})
    response = await client.post("/infer/openai/v1/completions", json=body, headers=AUTH)
    pieces: list[str] = []
    models: set[str] = set()
    finish = None
    usage = None
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        assert "error" not in chunk, chunk
        models.add(chunk["model"])
        for choice in chunk["choices"]:
            pieces.append(choice["text"])
            finish = choice.get("finish_reason") or finish
            started.set()
        usage = chunk.get("usage") or usage
    return {
        "status": response.status,
        "text": "".join(pieces),
        "models": models,
        "finish": finish,
        "usage": usage,
    }


async def _models(client: Any) -> list[dict[str, Any]]:
    response = await client.get("/models", headers=AUTH)
    models: list[dict[str, Any]] = (await response.json())["models"]
    return models


async def _pipeline_version(client: Any) -> str:
    body = await (await client.get("/pipelines", headers=AUTH)).json()
    version: str = body["pipelines"][0]["version"]
    return version


async def test_swap_under_four_streams_drops_nothing(
    make_client: Callable[..., Any], second_manifest: Path, manifest: ModelManifest
) -> None:
    client = await make_client(auth_token=TOKEN, model_swap="side_by_side")
    prompts = [f"Story {i}: once upon a time" for i in range(4)]
    # What each stream must say in full: the same greedy request, alone, before the swap.
    expected = []
    for prompt in prompts:
        response = await client.post(
            "/infer/openai/v1/completions", json=_completion(prompt), headers=AUTH
        )
        expected.append((await response.json())["choices"][0]["text"])
    version_before = (await (await client.get("/pipelines", headers=AUTH)).json())["pipelines"][0][
        "version"
    ]

    started = [asyncio.Event() for _ in prompts]
    streams = [
        asyncio.create_task(_stream(client, p, s)) for p, s in zip(prompts, started, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
    readiness: list[int] = []
    swapping = True

    async def watch_readiness() -> None:
        while swapping:
            readiness.append((await client.get("/readyz")).status)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_readiness())
    swap = await client.put("/models/active", json={"model": str(second_manifest)}, headers=AUTH)
    swapping = False
    await watcher
    result = await swap.json()
    assert swap.status == 200, result
    assert result["outcome"] == "swapped" and result["mode"] == "side_by_side"
    assert result["models"][0]["name"] == SECOND_NAME

    finished = await asyncio.gather(*streams)
    for stream, text in zip(finished, expected, strict=True):
        assert stream["status"] == 200
        assert stream["finish"] == "length"
        assert stream["usage"]["completion_tokens"] == STREAM_TOKENS
        assert stream["text"] == text, "a stream that began on the old model ends on it"
        assert stream["models"] == {manifest.name}
    assert readiness and set(readiness) == {200}, "ready all the way through"

    after = await client.post(
        "/infer/openai/v1/completions", json=_completion(prompts[0]), headers=AUTH
    )
    body = await after.json()
    assert after.status == 200 and body["model"] == SECOND_NAME
    assert body["choices"][0]["text"] != expected[0], "another model answers now"
    listed = await _models(client)
    assert listed[0]["name"] == SECOND_NAME and listed[0]["role"] == "active"
    assert listed[0]["sha"] == sha256_of(second_manifest.with_suffix(".gguf"))
    version_after = (await (await client.get("/pipelines", headers=AUTH)).json())["pipelines"][0][
        "version"
    ]
    assert version_after != version_before
    metrics = await (await client.get("/metrics")).text()
    assert f'edge_agent_model_info{{name="{SECOND_NAME}"' in metrics
    assert f'edge_agent_model_info{{name="{manifest.name}"' not in metrics


async def test_records_name_the_model_that_served_them(
    make_client: Callable[..., Any], second_manifest: Path, manifest: ModelManifest
) -> None:
    from tests.conftest import RecordingSink

    sink = RecordingSink()
    client = await make_client(records=sink, model_swap_access="open")
    body = _completion("Hello", max_tokens=4)
    assert (await client.post("/infer/openai/v1/completions", json=body)).status == 200
    swap = await client.put("/models/active", json={"model": str(second_manifest)})
    assert swap.status == 200, await swap.text()
    assert (await client.post("/infer/openai/v1/completions", json=body)).status == 200
    second = ModelManifest.model_validate({**_toml(second_manifest), "source": second_manifest})
    assert [r["model"]["name"] for r in sink.records] == [manifest.name, SECOND_NAME]
    assert sink.records[1]["model"]["version"] == second.version
    assert sink.records[0]["model"]["version"] == manifest.version


def _toml(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


async def _refused(client: Any, model: str) -> dict[str, Any]:
    swap = await client.put("/models/active", json={"model": model}, headers=AUTH)
    body: dict[str, Any] = await swap.json()
    assert swap.status == 422, body
    assert body["error"]["code"] == "model_swap_failed"
    return body


async def test_corrupt_candidates_are_refused_and_the_old_model_serves(
    make_client: Callable[..., Any],
    second_manifest: Path,
    manifest: ModelManifest,
    tmp_path: Path,
) -> None:
    client = await make_client(auth_token=TOKEN)
    gguf = second_manifest.with_suffix(".gguf")
    wrong_sha = write_manifest(tmp_path, "wrong-sha", gguf, "0" * 64)
    body = await _refused(client, str(wrong_sha))
    assert "sha256" in body["error"]["message"]
    candidate = (await _models(client))[-1]
    assert candidate["role"] == "candidate" and candidate["status"] == "Error"
    assert candidate["name"] == "wrong-sha" and "sha256" in candidate["reason"]

    # A truncated copy whose manifest carries the digest of what is there: it fails to load.
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 3])
    cut = write_manifest(tmp_path, "truncated", truncated, sha256_of(truncated))
    body = await _refused(client, str(cut))
    assert "failed to load" in body["error"]["message"]

    # Weights fine, canary text not the one the manifest pins.
    canary = write_manifest(tmp_path, "bad-canary", gguf, sha256_of(gguf), canary_sha256="1" * 64)
    body = await _refused(client, str(canary))
    assert "canary" in body["error"]["message"]

    listed = await _models(client)
    assert listed[0]["name"] == manifest.name and listed[0]["status"] == "Running"
    answer = await client.post(
        "/infer/openai/v1/completions", json=_completion("Hi", max_tokens=3), headers=AUTH
    )
    assert answer.status == 200 and (await answer.json())["model"] == manifest.name
    assert (await client.get("/readyz")).status == 200


@pytest.mark.parametrize("name", ["no-such-model", "x" * 5000, "bad\u0000name", "/etc/hostname"])
async def test_a_model_that_is_not_one_is_a_404(make_client: Callable[..., Any], name: str) -> None:
    client = await make_client(auth_token=TOKEN)
    swap = await client.put("/models/active", json={"model": name}, headers=AUTH)
    assert swap.status == 404
    assert (await swap.json())["error"]["code"] == "model_not_found"
    assert (await client.get("/readyz")).status == 200


async def test_without_a_token_the_lan_cannot_swap(
    make_client: Callable[..., Any], second_manifest: Path, manifest: ModelManifest
) -> None:
    client = await make_client()
    swap = await client.put("/models/active", json={"model": str(second_manifest)})
    assert swap.status == 403
    assert "auth_token" in (await swap.json())["error"]["message"]
    assert (await _models(client))[0]["name"] == manifest.name


async def test_a_token_is_required_when_one_is_set(
    make_client: Callable[..., Any], second_manifest: Path
) -> None:
    client = await make_client(auth_token=TOKEN)
    swap = await client.put("/models/active", json={"model": str(second_manifest)})
    assert swap.status == 401


async def test_drained_swap_refuses_new_requests_only_in_its_window(
    make_client: Callable[..., Any], second_manifest: Path, manifest: ModelManifest
) -> None:
    client = await make_client(auth_token=TOKEN, model_swap="drained")
    body = _completion("Count: one, two,", stream=True, max_tokens=400)
    # A stream read only a little: the drained swap must wait for it to finish.
    held = await client.post("/infer/openai/v1/completions", json=body, headers=AUTH)
    assert held.status == 200
    while not (await held.content.readline()).startswith(b"data: "):
        pass
    swap = asyncio.create_task(
        client.put("/models/active", json={"model": str(second_manifest)}, headers=AUTH)
    )
    for _ in range(3000):  # the window opens once the swap has checked the weights
        if (await (await client.get("/readyz")).json()).get("status") == "swapping":
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the drained swap never opened its window")
    refused = await client.post(
        "/infer/openai/v1/completions", json=_completion("Hi", max_tokens=2), headers=AUTH
    )
    assert refused.status == 503
    assert refused.headers["Retry-After"]
    assert (await refused.json())["error"]["code"] == "model_swapping"
    text = (await held.read()).decode()
    assert text.rstrip().endswith("data: [DONE]"), "the held stream finished on the old model"
    assert f'"model":"{manifest.name}"' in text.replace(" ", "")
    done = await swap
    result = await done.json()
    assert done.status == 200 and result["mode"] == "drained", result
    after = await client.post(
        "/infer/openai/v1/completions", json=_completion("Hi", max_tokens=2), headers=AUTH
    )
    assert after.status == 200 and (await after.json())["model"] == SECOND_NAME


async def test_a_failed_drained_swap_loads_the_old_model_again(
    make_client: Callable[..., Any], second_manifest: Path, manifest: ModelManifest, tmp_path: Path
) -> None:
    client = await make_client(auth_token=TOKEN, model_swap="drained")
    gguf = second_manifest.with_suffix(".gguf")
    canary = write_manifest(tmp_path, "bad-canary", gguf, sha256_of(gguf), canary_sha256="1" * 64)
    body = await _refused(client, str(canary))
    assert "canary" in body["error"]["message"]
    assert (await client.get("/readyz")).status == 200
    answer = await client.post(
        "/infer/openai/v1/completions", json=_completion("Hi", max_tokens=3), headers=AUTH
    )
    assert answer.status == 200 and (await answer.json())["model"] == manifest.name


async def test_a_drained_swap_checks_the_weights_before_its_window(
    make_client: Callable[..., Any], second_manifest: Path, manifest: ModelManifest, tmp_path: Path
) -> None:
    client = await make_client(auth_token=TOKEN, model_swap="drained")
    engine_pid = (await _models(client))[0]["engine"]["pid"]
    wrong = write_manifest(tmp_path, "wrong-sha", second_manifest.with_suffix(".gguf"), "0" * 64)
    assert "sha256" in (await _refused(client, str(wrong)))["error"]["message"]
    # Refused before the old model was stopped: the same engine still serves.
    assert (await _models(client))[0]["engine"]["pid"] == engine_pid
