"""Native inference (CONTRACT.md section 5) and which endpoint answers which model setting."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.errors import OPENAI_OFF_MESSAGE, OPENAI_ON_MESSAGE
from tests.conftest import Daemon

pytestmark = pytest.mark.slow

# The two troubleshooting messages of the product doc, as far as CONTRACT.md fixes them.
OFF_PREFIX = (
    "Inference failed. Please apply the appropriate OpenAI configurations to the models "
    "deployed in this pipeline."
)
ON_PREFIX = (
    "Inference failed. Please apply the appropriate OpenAI extensions to the inference endpoint."
)
PIPELINE = "edge-llm"
OPENAI_OFF_ENV = {"EDGE_AGENT_OPENAI_ENABLED": "false"}
RECORDS = [{"text": "Hello"}, {"text": "Good morning"}]


def post(
    daemon: Daemon, path: str, body: Any, content_type: str = "application/json"
) -> tuple[int, Any]:
    request = urllib.request.Request(
        daemon.url + path, data=json.dumps(body).encode(), headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with OpenAI compatibility off, shared by this module's tests."""
    server = Daemon(tmp_path_factory.mktemp("native"), env=OPENAI_OFF_ENV)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def assert_native_record(record: dict[str, Any], text: str) -> None:
    assert set(record) == {"time", "in", "out", "anomaly", "metadata"}
    assert isinstance(record["time"], int) and record["time"] > 1_600_000_000_000  # epoch ms
    assert record["in"] == {"text": text}
    assert isinstance(record["out"]["generated_text"], str) and record["out"]["generated_text"]
    assert record["anomaly"] == {"count": 0}
    metadata = record["metadata"]
    assert json.loads(metadata["last_model"])["model_name"] == "smollm2-135m-instruct"
    assert metadata["pipeline_version"]
    assert len(metadata["elapsed"]) == 1 and metadata["elapsed"][0] > 0
    assert metadata["dropped"] == []
    assert metadata["partition"] == socket.gethostname()


def test_the_messages_match_the_contract_prefixes() -> None:
    assert OPENAI_OFF_MESSAGE.startswith(OFF_PREFIX)
    assert OPENAI_ON_MESSAGE.startswith(ON_PREFIX)


@pytest.mark.parametrize("path", ["/infer", f"/pipelines/{PIPELINE}"])
def test_native_paths_round_trip_records(native: Daemon, path: str) -> None:
    status, answer = post(native, path, RECORDS)
    assert status == 200, answer
    assert len(answer) == len(RECORDS)
    for record, sent in zip(answer, RECORDS, strict=True):
        assert_native_record(record, sent["text"])


def test_the_pandas_records_media_type_is_accepted(native: Daemon) -> None:
    content_type = "application/json; format=pandas-records"
    status, answer = post(native, "/infer", RECORDS[:1], content_type=content_type)
    assert status == 200, answer
    assert_native_record(answer[0], RECORDS[0]["text"])


def test_another_pipeline_name_is_404(native: Daemon) -> None:
    status, answer = post(native, "/pipelines/other", RECORDS)
    assert status == 404
    assert answer["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_records_is_400(native: Daemon) -> None:
    status, answer = post(native, "/infer", {"text": "not a list"})
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error"


def test_an_empty_text_is_400_not_a_server_error(native: Daemon) -> None:
    # Found by the schemathesis sweep: an empty prompt reached the request model and was a 500.
    status, answer = post(native, "/infer", [{"text": "Hello"}, {"text": ""}])
    assert status == 400
    assert answer["error"]["param"] == "text"
    assert post(native, "/infer", RECORDS)[0] == 200


@pytest.mark.parametrize(
    "path", ["/infer/openai/v1/completions", "/infer/openai/v1/chat/completions"]
)
def test_openai_paths_with_openai_off_ask_for_openai_configurations(
    native: Daemon, path: str
) -> None:
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, answer = post(native, path, body)
    assert status == 400
    assert answer["error"]["message"].startswith(OFF_PREFIX)
    assert answer["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/infer", f"/pipelines/{PIPELINE}"])
def test_native_paths_with_openai_on_ask_for_openai_extensions(daemon: Daemon, path: str) -> None:
    status, answer = post(daemon, path, [{"text": "hello"}])
    assert status == 400
    assert answer["error"]["message"].startswith(ON_PREFIX)
    assert answer["error"]["type"] == "invalid_request_error"
