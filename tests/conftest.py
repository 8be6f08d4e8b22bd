"""Shared fixtures: the real default model, in-process apps and a real daemon subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from edge_agent.config import Settings
from edge_agent.engine.backend_choice import BackendChoice, build_backend
from edge_agent.engine.backends.llamacpp_process import LlamaCppProcessBackend
from edge_agent.engine.types import Backend
from edge_agent.manifest import ModelManifest, load_manifest
from edge_agent.server.app import create_app, wait_until_loaded
from edge_agent.server.state import RecordSink
from tests.engine.vllm_double import make_double_vllm_backend

REPO = Path(__file__).resolve().parent.parent
# The CPU-configuration verdict for this box and build, shared by the tests' daemons as a
# box's restarts share it; tests of the probes themselves use a fresh file.
PROBE_CACHE = Path(tempfile.gettempdir()) / f"edge-agent-tests-{os.getuid()}" / "probes.json"


class GatedLlamaCppBackend(LlamaCppProcessBackend):
    """The real llama.cpp backend whose loading waits for a gate: the loading window on demand."""

    def __init__(self, *args: Any, gate: asyncio.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = gate

    async def start(self) -> None:
        await self._gate.wait()
        await super().start()


class RecordingSink:
    """Keeps inference records in memory, for tests that look at what was logged."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)


@pytest.fixture(scope="session")
def manifest() -> ModelManifest:
    return load_manifest("smollm2-135m-instruct")


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "parallel": 4,
        "port": 0,
        "engine": {"probe_cache": PROBE_CACHE},
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def make_client(
    aiohttp_client: Any, manifest: ModelManifest, tmp_path: Path
) -> Callable[..., Any]:
    """Start the real app on loopback with the real model; settings overridable per test."""

    async def start(
        *,
        records: RecordSink | None = None,
        wait: bool = True,
        backend: str = "llamacpp",
        load_gate: asyncio.Event | None = None,
        **overrides: Any,
    ) -> TestClient[web.Request, web.Application]:
        settings = make_settings(tmp_path, **overrides)
        engine: Backend
        if backend == "vllm":
            # No GPU here: vLLM's engine is replaced by a double behind its real interface;
            # the adapter, scheduler and server under test are the real ones.
            engine = make_double_vllm_backend(manifest, parallel=settings.parallel)
        elif load_gate is None:
            # The daemon's own choice: llama.cpp in its supervised engine process.
            engine = build_backend(BackendChoice("llamacpp", "tests"), manifest, settings)
        else:
            engine = GatedLlamaCppBackend(
                manifest.gguf_path(),
                gate=load_gate,
                context_length=settings.context_size or manifest.context_length,
                parallel=settings.parallel,
                threads=settings.threads,
                prefix_cache=settings.prefix_cache,
                probe_cache=PROBE_CACHE,
            )
        app = create_app(settings, manifest, engine, records=records)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        if wait:
            await wait_until_loaded(app)
        return client

    return start


@pytest.fixture
async def client(make_client: Callable[..., Any]) -> TestClient[web.Request, web.Application]:
    result: TestClient[web.Request, web.Application] = await make_client()
    return result


@pytest.fixture(params=["llamacpp", "vllm"])
def backend_name(request: pytest.FixtureRequest) -> str:
    """Both backends, for the wire-format tests: a client must not tell them apart."""
    name: str = request.param
    return name


@pytest.fixture
async def any_client(
    make_client: Callable[..., Any], backend_name: str
) -> TestClient[web.Request, web.Application]:
    result: TestClient[web.Request, web.Application] = await make_client(backend=backend_name)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Daemon:
    """A real `edge-agent serve` subprocess on loopback."""

    def __init__(
        self,
        state_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        self.log_path = state_dir / "daemon.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        command = [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--state-dir",
            str(state_dir),
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "EDGE_AGENT_LOG_FORMAT": "json",
                "EDGE_AGENT_ENGINE__PROBE_CACHE": str(PROBE_CACHE),
                **(env or {}),
            },
            cwd=REPO,
            preexec_fn=preexec_fn,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready: {self.log_path.read_text()[-2000:]}")

    def post_json(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        """POST ``body`` as JSON to ``path``: the status and the JSON answer, errors too."""
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the session's black-box tests, started as the README starts it."""
    server = Daemon(tmp_path_factory.mktemp("daemon"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# The connection cap and the deadlines of a daemon under attack, small enough to reach.
GUARDED_CAP = 32
GUARDED_HTTP = {
    "EDGE_AGENT_HTTP__MAX_CONNECTIONS": str(GUARDED_CAP),
    "EDGE_AGENT_HTTP__HEADER_TIMEOUT_S": "3",
    "EDGE_AGENT_HTTP__BODY_TIMEOUT_S": "2",
}


@pytest.fixture(scope="session")
def guarded_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the hostile-client tests: a small connection cap, short deadlines."""
    server = Daemon(tmp_path_factory.mktemp("guarded"), env=GUARDED_HTTP)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons with their own settings; each is stopped at the end of the test."""
    started: list[Daemon] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        ready: bool = True,
        preexec_fn: Callable[[], None] | None = None,
    ) -> Daemon:
        server = Daemon(tmp_path / f"daemon{len(started)}", *args, env=env, preexec_fn=preexec_fn)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
