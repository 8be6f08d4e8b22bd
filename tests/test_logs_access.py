"""Who may read the inference log: logs_access, the bearer token, POST /logs, redaction."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from edge_agent.config import ConfigError, Settings, load_settings
from edge_agent.protocol.edge import OPENAI_PREFIX
from edge_agent.server.redaction import redact_request, redact_response
from edge_agent.server.reload import plan_reload
from edge_agent.server.state import STATE_KEY
from tests.conftest import RecordingSink
from tests.logbook.logbook_helpers import make_record

Client = TestClient[web.Request, web.Application]
TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PANDAS = {"Content-Type": "application/json; format=pandas-records"}


@pytest.fixture
async def box(make_client: Callable[..., Any]) -> Callable[..., Any]:
    """The real app with the real log store, its model left unloaded: no inference needed."""

    async def start(**settings: Any) -> Client:
        client: Client = await make_client(wait=False, load_gate=asyncio.Event(), **settings)
        return client

    return start


async def add_records(client: Client, count: int) -> list[str]:
    store = client.app[STATE_KEY].log_store
    assert store is not None
    records = [make_record(n, backend="llamacpp") for n in range(count)]
    for record in records:
        await store.append(record)
    return [record["id"] for record in records]


# --- logs_access --------------------------------------------------------------------------


def test_the_default_follows_the_token() -> None:
    assert Settings().effective_logs_access == "open"
    assert Settings(auth_token=TOKEN).effective_logs_access == "token"
    assert Settings(auth_token=TOKEN, logs_access="open").effective_logs_access == "open"


def test_token_access_without_a_token_fails_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_LOGS_ACCESS", "token")
    with pytest.raises(ConfigError, match="logs_access = 'token' needs auth_token"):
        load_settings()


async def test_without_a_token_the_log_is_open_to_everyone(box: Callable[..., Any]) -> None:
    client = await box()
    await add_records(client, 1)
    assert (await client.get("/logs")).status == 200
    assert (await client.post("/logs", json={})).status == 200


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_with_a_token_the_log_needs_it(box: Callable[..., Any], method: str) -> None:
    client = await box(auth_token=TOKEN)
    await add_records(client, 1)
    refused = await client.request(method, "/logs", json={} if method == "POST" else None)
    assert refused.status == 401
    assert (await refused.json())["error"]["type"] == "authentication_error"
    wrong = await client.request(method, "/logs", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    allowed = await client.request(
        method, "/logs", headers=BEARER, json={} if method == "POST" else None
    )
    assert allowed.status == 200


async def test_open_access_leaves_inference_guarded(box: Callable[..., Any]) -> None:
    client = await box(auth_token=TOKEN, logs_access="open")
    assert (await client.get("/logs")).status == 200
    inference = await client.post(f"{OPENAI_PREFIX}/completions", json={"prompt": "hi"})
    assert inference.status == 401


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_off_serves_the_log_to_nobody(box: Callable[..., Any], method: str) -> None:
    client = await box(auth_token=TOKEN, logs_access="off")
    response = await client.request(method, "/logs", headers=BEARER)
    assert response.status == 404
    assert "logs_access" in (await response.json())["error"]["message"]
    spec = yaml.safe_load(await (await client.get("/openapi.yaml")).text())
    assert "/logs" not in spec["paths"]


async def test_a_non_ascii_token_is_a_401_not_a_500(box: Callable[..., Any]) -> None:
    client = await box(auth_token=TOKEN)
    response = await client.get("/logs", headers={"Authorization": "Bearer s3crét-tøken"})
    assert response.status == 401


async def test_the_document_says_which_log_paths_are_open(box: Callable[..., Any]) -> None:
    guarded = await box(auth_token=TOKEN)
    spec = yaml.safe_load(await (await guarded.get("/openapi.yaml")).text())
    assert "security" not in spec["paths"]["/logs"]["post"]  # the document's default: bearer
    assert "401" in spec["paths"]["/logs"]["post"]["responses"]


# --- POST /logs ---------------------------------------------------------------------------


async def test_post_logs_answers_pandas_records_oldest_first(box: Callable[..., Any]) -> None:
    client = await box()
    ids = await add_records(client, 5)
    response = await client.post("/logs", data=b"{}", headers=PANDAS)
    assert response.status == 200
    records = await response.json()
    assert [r["id"] for r in records] == ids
    assert json.loads(records[-1]["out"]["json"]) == {"choices": [{"text": "ok"}]}


async def test_post_logs_filters_by_limit_and_since(box: Callable[..., Any]) -> None:
    client = await box()
    ids = await add_records(client, 5)
    latest_two = await (await client.post("/logs", json={"limit": 2}, headers=PANDAS)).json()
    assert [r["id"] for r in latest_two] == ids[-2:]
    after = await (await client.post("/logs", json={"since": ids[1]})).json()
    assert [r["id"] for r in after] == ids[2:]


@pytest.mark.parametrize(
    ("body", "content_type", "param"),
    [
        (b'{"limt": 5}', "application/json", "limt"),
        (b'{"limit": 0}', "application/json", "limit"),
        (b'{"limit": 5000}', "application/json", "limit"),
        (b'{"limit": 5, "limit": 6}', "application/json", None),
        (b"[]", "application/json", None),
        (b"{", "application/json", None),
        (b"", "application/json", None),
        (b"\n", "application/json", None),
        (b"{}", "text/csv", None),
    ],
)
async def test_bad_log_queries_are_400s_naming_the_filter(
    box: Callable[..., Any], body: bytes, content_type: str, param: str | None
) -> None:
    client = await box()
    response = await client.post("/logs", data=body, headers={"Content-Type": content_type})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_logs_access_changes_on_reload() -> None:
    running = Settings(auth_token=TOKEN)
    plan = plan_reload(running, running.model_copy(update={"logs_access": "off"}))
    assert plan.applied == ["logs_access"] and plan.settings.effective_logs_access == "off"


# --- logs.store_text = false --------------------------------------------------------------


def test_redaction_keeps_parameters_and_drops_the_prompt() -> None:
    chat = {"messages": [{"role": "user", "content": "my secret"}], "max_tokens": 5, "user": "u"}
    assert redact_request(chat) == {"max_tokens": 5, "user": "u"}
    assert redact_request([{"text": "my secret"}]) == [{}]
    assert redact_request("not json: my secret") is None
    embedding = {"input": ["my secret", "another"], "encoding_format": "float"}
    assert redact_request(embedding) == {"encoding_format": "float"}


def test_redaction_keeps_usage_and_finish_reasons_and_drops_the_text() -> None:
    response = {
        "id": "chatcmpl-1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "secret"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "ttft": 0.01, "tps": 50.0},
    }
    redacted = json.loads(redact_response(json.dumps(response)) or "null")
    assert redacted["choices"] == [{"index": 0, "finish_reason": "stop"}]
    assert redacted["usage"] == response["usage"]
    assert "secret" not in json.dumps(redacted)


async def test_store_text_off_writes_no_prompt_or_completion(
    make_client: Callable[..., Any],
) -> None:
    records = RecordingSink()
    client = await make_client(records=records, logs={"store_text": False})
    body = {"prompt": "my secret prompt", "max_tokens": 4, "temperature": 0}
    response = await client.post(f"{OPENAI_PREFIX}/completions", json=body)
    answer = await response.json()
    [record] = records.records
    assert record["in"] == {"max_tokens": 4, "temperature": 0}
    stored = json.loads(record["out"]["json"])
    assert stored["usage"] == answer["usage"] and stored["id"] == answer["id"]
    choice = answer["choices"][0]
    kept = {
        "index": 0,
        "finish_reason": choice["finish_reason"],
        "stop_reason": choice["stop_reason"],
    }
    assert stored["choices"] == [kept]
    assert "secret" not in json.dumps(record)
    assert record["metrics"]["completion_tokens"] == answer["usage"]["completion_tokens"]
