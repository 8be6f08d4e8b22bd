"""``edge-agent models install | use | rollback`` and SIGHUP, against a real daemon.

The CLI asks the daemon through the state directory and a signal, as ``systemctl reload``
does, and its exit status says whether the new model serves.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.manifest import ModelManifest, load_manifest, sha256_of
from tests.conftest import REPO, Daemon
from tests.second_model import SECOND_NAME, make_second_model


@pytest.fixture(scope="module")
def second_manifest(tmp_path_factory: pytest.TempPathFactory, manifest: ModelManifest) -> Path:
    return make_second_model(tmp_path_factory.mktemp("second-model"), manifest)


def models_cli(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "models", *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def serving(daemon: Daemon) -> str:
    with urllib.request.urlopen(f"{daemon.url}/models", timeout=10) as response:
        name: str = json.load(response)["models"][0]["name"]
        return name


def completion_model(daemon: Daemon) -> str:
    status, body = daemon.post_json(
        "/infer/openai/v1/completions", {"prompt": "Hi", "max_tokens": 2}
    )
    assert status == 200, body
    model: str = body["model"]
    return model


def test_install_copies_the_weights_and_checks_their_sha256(
    second_manifest: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    done = models_cli("install", str(second_manifest), state_dir=state)
    assert done.returncode == 0, done.stderr
    installed = load_manifest(SECOND_NAME, state / "models")
    assert installed.gguf_path().is_relative_to(state / "models")
    assert sha256_of(installed.gguf_path()) == installed.sha256
    assert installed.sha256 == sha256_of(second_manifest.with_suffix(".gguf"))

    # A bare GGUF with a digest that is not its own: refused, nothing left behind.
    wrong = models_cli(
        "install",
        str(second_manifest.with_suffix(".gguf")),
        "--name",
        "wrong",
        "--sha256",
        "0" * 64,
        state_dir=state,
    )
    assert wrong.returncode == 1 and "sha256" in wrong.stderr
    leftovers = list((state / "models" / "wrong").glob("*")) if (state / "models").exists() else []
    assert leftovers == []
    assert not (state / "models" / "wrong.toml").exists()


def test_use_rollback_and_restart_on_a_running_daemon(
    start_daemon: Callable[..., Daemon], second_manifest: Path, manifest: ModelManifest
) -> None:
    daemon = start_daemon()
    state = daemon.state_dir
    assert models_cli("install", str(second_manifest), state_dir=state).returncode == 0

    used = models_cli("use", SECOND_NAME, state_dir=state)
    assert used.returncode == 0, used.stderr
    assert serving(daemon) == SECOND_NAME and completion_model(daemon) == SECOND_NAME

    back = models_cli("rollback", state_dir=state)
    assert back.returncode == 0, back.stderr
    assert serving(daemon) == manifest.name and completion_model(daemon) == manifest.name

    # The installed copy damaged on disk: the swap is refused, the exit status says so.
    installed = load_manifest(SECOND_NAME, state / "models").gguf_path()
    original = installed.read_bytes()
    installed.write_bytes(original[: len(original) // 2])
    refused = models_cli("use", SECOND_NAME, state_dir=state)
    assert refused.returncode == 1
    assert "sha256" in refused.stderr
    assert serving(daemon) == manifest.name and completion_model(daemon) == manifest.name
    installed.write_bytes(original)

    # The choice outlives the process: a restart serves the model swapped to.
    assert models_cli("use", SECOND_NAME, state_dir=state).returncode == 0
    daemon.stop()
    restarted = Daemon(state)
    try:
        restarted.wait_ready()
        assert serving(restarted) == SECOND_NAME
    finally:
        restarted.stop()


def test_use_without_a_daemon_takes_effect_at_the_next_start(
    second_manifest: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    assert models_cli("install", str(second_manifest), state_dir=state).returncode == 0
    used = models_cli("use", SECOND_NAME, state_dir=state)
    assert used.returncode == 0 and "next start" in used.stdout
    listing = models_cli("list", state_dir=state)
    assert f"serving: {SECOND_NAME}" in listing.stdout


def test_sighup_with_a_new_model_in_the_config_swaps_it(
    start_daemon: Callable[..., Daemon],
    second_manifest: Path,
    manifest: ModelManifest,
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'model = "{manifest.name}"\n')
    daemon = start_daemon("--config", str(config))
    assert serving(daemon) == manifest.name
    config.write_text(f'model = "{second_manifest}"\n')
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    while serving(daemon) != SECOND_NAME:
        assert time.monotonic() < deadline, daemon.log_path.read_text()[-2000:]
        time.sleep(0.2)
    assert completion_model(daemon) == SECOND_NAME
    assert (daemon.state_dir / "model-swap.json").is_file() and json.loads(
        (daemon.state_dir / "model-swap.json").read_text()
    )["ok"]
