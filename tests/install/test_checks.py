"""`edge-agent check` passes a good set-up and names what is wrong with a bad one."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.checks import (
    check_config,
    exit_code,
    format_results,
    run_checks,
    run_checks_for_config,
)
from edge_agent.config import Settings
from edge_agent.engine.backends.llamacpp_wire import FAULT_ENV
from edge_agent.manifest import ModelManifest


def manifest_file(tmp_path: Path, gguf: Path, sha256: str) -> Path:
    path = tmp_path / "model.toml"
    path.write_text(f'name = "m"\n[gguf]\npath = "{gguf}"\nsha256 = "{sha256}"\n')
    return path


def failures(settings: Settings) -> dict[str, str]:
    return {r.name: r.detail for r in run_checks(settings) if not r.ok}


def test_a_good_setup_passes(tmp_path: Path) -> None:
    results = run_checks(Settings(state_dir=tmp_path / "state", port=0))
    assert all(r.ok for r in results), format_results(results)
    assert {r.name for r in results} == {
        "config", "model manifest", "model weights", "backend", "engine", "port",
        "state directory",
    }  # fmt: skip
    assert format_results(results).endswith("all checks passed")
    assert exit_code(results) == 0
    assert not (tmp_path / "state").exists(), "a check creates nothing"


def test_the_engine_check_decodes_and_says_which_configuration_serves(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, port=0, engine={"probe_cache": tmp_path / "p.json"})
    (engine,) = [r for r in run_checks(settings) if r.name == "engine"]
    assert engine.ok and engine.detail.startswith("repack: decoded on this box")
    (again,) = [r for r in run_checks(settings) if r.name == "engine"]
    assert again.detail.endswith("(verdict cached for this build and CPU)")


def test_an_engine_that_crashes_under_every_configuration_fails_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "segv:repack")  # a real SIGSEGV in the probe process
    settings = Settings(
        state_dir=tmp_path, port=0, cpu_repack="on", engine={"probe_cache": tmp_path / "p.json"}
    )
    failed = failures(settings)
    assert list(failed) == ["engine"]
    assert "repack crashed: SIGSEGV" in failed["engine"]
    assert "-DGGML_NATIVE=OFF" in failed["engine"] and 'cpu_repack = "off"' in failed["engine"]


def test_a_wrong_sha256_fails(tmp_path: Path, manifest: ModelManifest) -> None:
    model = manifest_file(tmp_path, manifest.gguf_path(), "0" * 64)
    results = run_checks(Settings(model=str(model), state_dir=tmp_path, port=0))
    failed = {r.name: r.detail for r in results if not r.ok}
    assert list(failed) == ["model weights"]
    assert f"manifest says {'0' * 64}" in failed["model weights"]
    assert manifest.sha256 in failed["model weights"]  # what the file really hashes to
    assert exit_code(results) == 1
    assert format_results(results).endswith("some checks failed")


def test_a_missing_model_file_fails(tmp_path: Path) -> None:
    model = manifest_file(tmp_path, tmp_path / "gone.gguf", "0" * 64)
    failed = failures(Settings(model=str(model), state_dir=tmp_path, port=0))
    assert failed["model weights"] == f"missing: {tmp_path / 'gone.gguf'}"


def test_a_missing_manifest_fails(tmp_path: Path) -> None:
    failed = failures(Settings(model=str(tmp_path / "nope.toml"), state_dir=tmp_path, port=0))
    assert str(tmp_path / "nope.toml") in failed["model manifest"]


def test_vllm_without_a_gpu_or_vllm_fails(tmp_path: Path) -> None:
    failed = failures(Settings(backend="vllm", state_dir=tmp_path, port=0))
    assert failed["backend"].startswith("backend vllm cannot start")


def test_a_port_in_use_fails(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        failed = failures(Settings(host="127.0.0.1", port=port, state_dir=tmp_path))
    assert failed["port"] == f"cannot listen on 127.0.0.1:{port}: in use by another program"


def test_a_state_dir_under_a_file_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    failed = failures(Settings(state_dir=blocker / "state", port=0))
    assert failed["state directory"] == (
        f"{blocker / 'state'}: cannot be created: {blocker} is not a directory"
    )


@contextlib.contextmanager
def without_root() -> Iterator[None]:
    """Judge file access as nobody: root writes through file modes, so drop them for a while."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


NOBODY = 65534


def state_dir_failure(state_dir: Path) -> str | None:
    with without_root():
        return failures(Settings(state_dir=state_dir, port=0)).get("state directory")


def test_a_read_only_state_dir_fails() -> None:
    # Not under pytest's tmp_path, whose parents are closed to other users.
    base = Path(tempfile.mkdtemp(prefix="edge-agent-check-"))
    base.chmod(0o755)
    state = base / "state"
    state.mkdir(mode=0o555)
    try:
        failed = state_dir_failure(state)
        assert failed is not None and failed.startswith(f"{state}: not writable")
        failed = state_dir_failure(state / "sub")
        assert failed is not None and failed.endswith(f"{state} is not writable")
        state.chmod(0o777)
        assert state_dir_failure(state) is None, "the same directory, writable, passes"
    finally:
        shutil.rmtree(base)


def test_a_bad_config_fails_with_its_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("port = 99999\n")
    result, settings = check_config(config)
    assert settings is None and not result.ok
    assert result.detail.startswith(f"{config}: port:")
    assert "\n" not in result.detail
    assert run_checks_for_config(config) == [result]


def test_a_missing_config_fails(tmp_path: Path) -> None:
    result, _ = check_config(tmp_path / "absent.toml")
    assert result.detail == f"config file not found: {tmp_path / 'absent.toml'}"


def test_a_good_config_runs_every_check(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'port = 0\nstate_dir = "{tmp_path / "state"}"\n')
    results = run_checks_for_config(config, check_port=False)
    assert [r.name for r in results] == [
        "config", "model manifest", "model weights", "backend", "engine", "state directory",
    ]  # fmt: skip
    assert exit_code(results) == 0, format_results(results)
