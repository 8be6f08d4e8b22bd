"""Settings precedence and start-up failures: one clear line, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_settings, parse_size


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_beat_environment_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", 'port = 7000\nhost = "127.0.0.1"\nparallel = 2\n')
    monkeypatch.setenv("EDGE_AGENT_PORT", "7100")
    monkeypatch.setenv("EDGE_AGENT_PARALLEL", "3")
    settings = load_settings(config, port=7200)
    assert settings.port == 7200  # flag
    assert settings.parallel == 3  # environment over file
    assert settings.host == "127.0.0.1"  # file over default


def test_nested_environment_and_storage_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_UPLOAD__URL", "http://collector:8090/ingest")
    monkeypatch.setenv("LOCAL_INFERENCE_STORAGE", "512Mi")
    settings = load_settings(write(tmp_path / "c.toml", ""))
    assert settings.upload.url == "http://collector:8090/ingest"
    assert settings.logs.max_bytes == 512 * 1024**2


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("port = 99999\n", "port"),
        ('backend = "tpu"\n', "backend"),
        ("prot = 8080\n", "prot"),
        ("port = \n", "not valid TOML"),
        ("[logs]\nmax_bytes = 'lots'\n", "logs.max_bytes"),
    ],
)
def test_a_bad_config_is_one_clear_line(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path / "c.toml", text))
    message = str(raised.value)
    assert fragment in message and "\n" not in message


def test_sizes() -> None:
    assert parse_size("10Gi") == 10 * 1024**3
    assert parse_size("1.5M") == 1_500_000
    assert parse_size(42) == 42
    with pytest.raises(ValueError):
        parse_size("ten gigs")


def test_serve_with_a_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "port = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "port" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_help_names_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    for flag in ("--config", "--host", "--port", "--state-dir"):
        assert flag in result.stdout
