"""The daemon's own log lines are structlog events, and writing them never fails a request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow


def test_a_log_reader_that_went_away_does_not_fail_requests(tmp_path: Path) -> None:
    """stderr piped to a reader that died (a killed `| tee`): each log line meets EPIPE."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "EDGE_AGENT_LOG_FORMAT": "json"},
        cwd=REPO,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        events = []
        for line in process.stderr:  # structlog's JSON lines, until the model is ready
            event = json.loads(line)
            events.append((event["level"], event["event"]))
            if event["event"] == "model_ready":
                break
        assert ("info", "backend_chosen") in events and ("info", "listening") in events
        process.stderr.close()  # the reader goes away
        body = json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
        for _ in range(3):
            request = urllib.request.Request(
                f"{url}/infer/openai/v1/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.status == 200
                assert json.loads(response.read())["usage"]["completion_tokens"] == 2
        with urllib.request.urlopen(f"{url}/logs", timeout=10) as response:
            records = json.loads(response.read())["data"]
        assert [r["status"] for r in records] == ["ok", "ok", "ok"]
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
