"""`edge-agent check` passes a good set-up and names what is wrong with a bad one."""

from __future__ import annotations

import socket
from pathlib import Path

from edge_agent.checks import format_results, run_checks
from edge_agent.config import Settings
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
    assert format_results(results).endswith("all checks passed")


def test_a_wrong_sha256_fails(tmp_path: Path, manifest: ModelManifest) -> None:
    model = manifest_file(tmp_path, manifest.gguf_path(), "0" * 64)
    failed = failures(Settings(model=str(model), state_dir=tmp_path, port=0))
    assert "sha256" in failed["model weights"] and "0" * 64 in failed["model weights"]


def test_a_missing_model_file_fails(tmp_path: Path) -> None:
    model = manifest_file(tmp_path, tmp_path / "gone.gguf", "0" * 64)
    failed = failures(Settings(model=str(model), state_dir=tmp_path, port=0))
    assert "missing" in failed["model weights"]


def test_a_port_in_use_fails(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        failed = failures(Settings(host="127.0.0.1", port=port, state_dir=tmp_path))
    assert "in use" in failed["port"]


def test_an_unwritable_state_dir_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    failed = failures(Settings(state_dir=blocker / "state", port=0))
    assert str(blocker / "state") in failed["state directory"]
