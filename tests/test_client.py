"""The SDK: the product doc's pipeline examples with EdgePipeline as the pipeline object."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openapi_spec_validator import validate

import edge_agent.client
from edge_agent.client import AsyncEdgePipeline, EdgePipeline
from edge_agent.engine.backends.llamacpp import LlamaCppBackend
from edge_agent.manifest import ModelManifest
from edge_agent.server.app import create_app, wait_until_loaded
from tests.conftest import Daemon, make_settings

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def pipeline(daemon: Daemon) -> EdgePipeline:
    return EdgePipeline(daemon.url, max_retries=0)


def assert_usage(usage: Any, max_tokens: int) -> None:
    assert usage is not None
    assert 0 < usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extra = usage.model_extra or {}
    assert extra["ttft"] > 0 and extra["tps"] > 0


# --- the product doc's four examples ------------------------------------------------------


def test_openai_chat_completion(pipeline: EdgePipeline) -> None:
    response = pipeline.openai_chat_completion(
        messages=[{"role": "user", "content": "good morning"}], max_tokens=24
    )
    assert isinstance(response, ChatCompletion)
    assert response.model == MODEL
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")
    assert_usage(response.usage, 24)


def test_openai_chat_completion_with_token_streaming(pipeline: EdgePipeline) -> None:
    stream = pipeline.openai_chat_completion(
        messages=[{"role": "user", "content": "this is a short story about love"}],
        max_tokens=24,
        stream=True,
    )
    assert isinstance(stream, openai.Stream)
    text, finishes, usages = "", [], []
    for chunk in stream:  # the doc's loop: chunk.choices[0] is safe on every chunk
        text += chunk.choices[0].delta.content or ""
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert text.strip()
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert len(usages) == 1
    assert_usage(usages[0], 24)


def test_openai_completion(pipeline: EdgePipeline) -> None:
    response = pipeline.openai_completion(prompt="tell me about wallaroo.AI", max_tokens=24)
    assert isinstance(response, Completion)
    assert response.choices[0].text
    assert response.choices[0].finish_reason in ("stop", "length")
    assert_usage(response.usage, 24)


def test_openai_completion_with_token_streaming(pipeline: EdgePipeline) -> None:
    stream = pipeline.openai_completion(prompt="tell me a short story", max_tokens=24, stream=True)
    assert isinstance(stream, openai.Stream)
    text, finishes, usages = "", [], []
    for chunk in stream:
        text += chunk.choices[0].text
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert text
    assert len(finishes) == 1
    assert_usage(usages[0], 24)


# --- errors are the openai package's exceptions, with the server's message ---------------


def test_a_bad_parameter_is_openai_bad_request_with_the_servers_message(
    pipeline: EdgePipeline,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        pipeline.openai_completion(prompt="hi", max_tokens=0)
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "max_tokens"
    assert body["message"] in str(caught.value)


def test_native_infer_with_openai_on_is_bad_request_asking_for_extensions(
    pipeline: EdgePipeline,
) -> None:
    with pytest.raises(openai.BadRequestError, match="appropriate OpenAI extensions"):
        pipeline.infer([{"text": "hello"}])


def test_logs_limit_out_of_range_is_bad_request(pipeline: EdgePipeline) -> None:
    # Above the box's 1000 a page, logs() reads page by page; below 1 the box says no.
    with pytest.raises(openai.BadRequestError, match="limit"):
        pipeline.logs(limit=0)


def test_a_token_box_refuses_a_client_without_it(start_daemon: Callable[..., Daemon]) -> None:
    box = start_daemon(env={"EDGE_AGENT_AUTH_TOKEN": "s3cret"})
    with pytest.raises(openai.AuthenticationError, match="bearer token"):
        EdgePipeline(box.url, max_retries=0).openai_completion(prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        EdgePipeline(box.url, max_retries=0).logs()
    answer = EdgePipeline(box.url, token="s3cret").openai_completion(prompt="hi", max_tokens=2)
    assert isinstance(answer, Completion) and answer.choices[0].text is not None
    # The log follows the token too (logs_access defaults to token when one is set).
    frame = EdgePipeline(box.url, token="s3cret").logs(limit=1)
    assert json.loads(frame.iloc[-1]["out.json"])["id"] == answer.id


# --- native inference, logs, pipeline name ------------------------------------------------


def test_infer_round_trips_records_on_a_native_box(start_daemon: Callable[..., Daemon]) -> None:
    box = start_daemon(env={"EDGE_AGENT_OPENAI_ENABLED": "false"})
    records = EdgePipeline(box.url).infer([{"text": "Hello"}])
    assert len(records) == 1
    assert records[0]["in"] == {"text": "Hello"}
    assert records[0]["out"]["generated_text"]
    named = EdgePipeline(box.url, pipeline="edge-llm").infer([{"text": "Hi"}])
    assert named[0]["in"] == {"text": "Hi"}
    with pytest.raises(openai.NotFoundError, match="other"):
        EdgePipeline(box.url, pipeline="other", max_retries=0).infer([{"text": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="appropriate OpenAI configurations"):
        EdgePipeline(box.url, max_retries=0).openai_completion(prompt="hi", max_tokens=2)


def test_logs_are_a_dataframe_with_the_latest_request_last(pipeline: EdgePipeline) -> None:
    prompt = f"log me {uuid.uuid4().hex}"
    pipeline.openai_completion(prompt=prompt, max_tokens=4)
    frame = pipeline.logs(limit=5)
    assert {"time", "in.prompt", "out.json", "metrics.ttft", "metrics.tps"} <= set(frame.columns)
    latest = frame.iloc[-1]  # as the product doc reads it: the most recent record
    assert latest["in.prompt"] == prompt
    out = json.loads(latest["out.json"])
    assert out["usage"]["ttft"] == pytest.approx(latest["metrics.ttft"])
    assert latest["metrics.tps"] > 0
    assert frame["time"].is_monotonic_increasing


def test_logs_by_time_range_are_exactly_the_requests_made_in_it(
    pipeline: EdgePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline.openai_completion(prompt="before the range", max_tokens=2)
    start = datetime.now(UTC)
    prompts = [f"in range {n} {uuid.uuid4().hex}" for n in range(3)]
    for prompt in prompts:
        pipeline.openai_completion(prompt=prompt, max_tokens=2)
    end = datetime.now(UTC) + timedelta(milliseconds=1)
    pipeline.openai_completion(prompt="after the range", max_tokens=2)

    frame = pipeline.logs(start_datetime=start, end_datetime=end)
    assert list(frame["in.prompt"]) == prompts  # oldest first, as logs() always is
    assert list(pipeline.logs(start_datetime=start, limit=2)["in.prompt"]) == [
        prompts[-1],
        "after the range",
    ]
    # A limit beyond one answer is read page by page; pages of one record show it.
    monkeypatch.setattr(edge_agent.client, "_PAGE", 1)
    paged = pipeline.logs(start_datetime=start, end_datetime=end, limit=10)
    assert list(paged["in.prompt"]) == prompts


def test_stats_are_a_dataframe_per_bucket_that_adds_up_to_the_log(pipeline: EdgePipeline) -> None:
    pipeline.openai_completion(prompt="counted", max_tokens=4)
    frame = pipeline.stats(window="24h")
    assert {"ttft_p50", "ttft_p95", "ttft_count", "tps_p50", "requests", "ok"} <= set(frame.columns)
    assert frame.index.is_monotonic_increasing and str(frame.index.tz) == "UTC"
    records = pipeline.logs(limit=100_000)
    assert frame["requests"].sum() == len(records)
    assert frame["ok"].sum() == (records["status"] == "ok").sum()
    assert (frame["ttft_p95"].dropna() >= frame["ttft_p50"].dropna()).all()
    with pytest.raises(openai.BadRequestError, match="window"):
        pipeline.stats(window="1y")


def test_status_is_the_boxs_state(pipeline: EdgePipeline) -> None:
    status = pipeline.status()
    assert status["ready"] is True and status["model"]["name"] == MODEL
    assert status["engine"]["slots"] >= 1


def test_the_pipeline_name_comes_from_the_box(pipeline: EdgePipeline) -> None:
    assert pipeline.pipeline_name() == "edge-llm"
    assert EdgePipeline("http://unused", pipeline="given").pipeline_name() == "given"


def test_openai_client_is_the_openai_package_pointed_at_the_box(pipeline: EdgePipeline) -> None:
    client = pipeline.openai_client()
    assert isinstance(client, openai.OpenAI)
    assert str(client.base_url).rstrip("/") == f"{pipeline.url}/infer/openai/v1"
    assert [model.id for model in client.models.list().data] == [MODEL]


# --- the api spec, against an app that serves /openapi.yaml --------------------------------


@pytest.fixture
async def spec_app(
    aiohttp_client: Any, manifest: ModelManifest, tmp_path: Path
) -> TestClient[web.Request, web.Application]:
    settings = make_settings(tmp_path)
    backend = LlamaCppBackend(manifest.gguf_path(), context_length=manifest.context_length)
    app = create_app(settings, manifest, backend)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
    await wait_until_loaded(app)
    return client


async def test_generate_api_spec_writes_pipeline_yaml_in_the_current_directory(
    spec_app: TestClient[web.Request, web.Application],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    url = str(spec_app.make_url("")).rstrip("/")
    # The sync SDK blocks: run it off the loop that serves the app.
    written = await asyncio.to_thread(EdgePipeline(url).generate_api_spec)
    assert written == Path("edge-llm.yaml") and written.is_file()
    spec = yaml.safe_load(written.read_text())
    validate(spec)
    assert spec["servers"] == [{"url": url}]

    target = tmp_path / "elsewhere.yaml"
    assert await AsyncEdgePipeline(url).generate_api_spec(target) == target
    validate(yaml.safe_load(target.read_text()))


# --- the async twin ----------------------------------------------------------------------


async def test_async_pipeline_has_the_same_methods(daemon: Daemon) -> None:
    async with AsyncEdgePipeline(daemon.url, max_retries=0) as pipeline:
        chat = await pipeline.openai_chat_completion(
            messages=[{"role": "user", "content": "good morning"}], max_tokens=8
        )
        assert isinstance(chat, ChatCompletion) and chat.choices[0].message.content
        assert_usage(chat.usage, 8)

        stream = await pipeline.openai_completion(
            prompt="tell me a short story", max_tokens=8, stream=True
        )
        assert isinstance(stream, openai.AsyncStream)
        text = "".join([chunk.choices[0].text async for chunk in stream])
        assert text

        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            await pipeline.openai_completion(prompt="hi", max_tokens=0)
        with pytest.raises(openai.BadRequestError, match="OpenAI extensions"):
            await pipeline.infer([{"text": "hello"}])

        frame = await pipeline.logs(limit=3)
        assert len(frame) == 3 and "out.json" in frame.columns
        since = frame["time"].iloc[0].to_pydatetime()
        window = await pipeline.logs(start_datetime=since, end_datetime=datetime.now(UTC))
        assert list(window["id"])[-3:] == list(frame["id"])
        stats = await pipeline.stats(window="1h", step="1h")
        assert stats["requests"].sum() >= 3 and stats["ttft_count"].sum() >= 2
        assert (await pipeline.status())["state"] == "ready"
        assert await pipeline.pipeline_name() == "edge-llm"


async def test_async_openai_client_of_the_sync_pipeline(daemon: Daemon) -> None:
    client = EdgePipeline(daemon.url).async_openai_client()
    assert isinstance(client, openai.AsyncOpenAI)
    models = await client.models.list()
    assert [model.id for model in models.data] == [MODEL]
    await client.close()


def test_logs_without_pandas_says_what_to_install(
    pipeline: EdgePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    with pytest.raises(ImportError, match="install pandas"):
        pipeline.logs()
