"""`edge-agent check`: what an operator (or install.sh) verifies before starting the service."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_agent.config import Settings
from edge_agent.engine.backend_choice import BackendChoiceError, choose_backend
from edge_agent.manifest import ManifestError, ModelManifest, load_manifest, sha256_of


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def run_checks(settings: Settings, *, check_port: bool = True) -> list[CheckResult]:
    results = [CheckResult("config", True, "settings are valid")]
    manifest = _manifest(settings, results)
    if manifest is not None:
        results.append(_weights(manifest))
        results.append(_backend(settings, manifest))
    if check_port:
        results.append(_port(settings.host, settings.port))
    results.append(_state_dir(settings.state_dir))
    return results


def _manifest(settings: Settings, results: list[CheckResult]) -> ModelManifest | None:
    try:
        manifest = load_manifest(settings.model)
    except ManifestError as exc:
        results.append(CheckResult("model manifest", False, str(exc)))
        return None
    results.append(CheckResult("model manifest", True, f"{manifest.name} ({manifest.source})"))
    return manifest


def _weights(manifest: ModelManifest) -> CheckResult:
    if manifest.gguf is None:
        assert manifest.hf is not None
        present = manifest.hf.path.is_dir()
        return CheckResult("model weights", present, f"vLLM directory {manifest.hf.path}")
    try:
        path = manifest.gguf_path()
    except ManifestError as exc:
        return CheckResult("model weights", False, str(exc))
    if not path.is_file():
        return CheckResult("model weights", False, f"missing: {path}")
    digest = sha256_of(path)
    if digest != manifest.gguf.sha256:
        return CheckResult(
            "model weights", False, f"{path}: sha256 {digest}, manifest says {manifest.gguf.sha256}"
        )
    return CheckResult("model weights", True, f"{path} (sha256 matches)")


def _backend(settings: Settings, manifest: ModelManifest) -> CheckResult:
    try:
        choice = choose_backend(settings.backend, manifest)
    except BackendChoiceError as exc:
        return CheckResult("backend", False, str(exc))
    if choice.name == "llamacpp":
        try:
            import llama_cpp
        except ImportError as exc:
            return CheckResult("backend", False, f"llama-cpp-python does not import: {exc}")
        return CheckResult(
            "backend", True, f"{choice.reason} (llama-cpp-python {llama_cpp.__version__})"
        )
    return CheckResult("backend", True, choice.reason)


def _port(host: str, port: int) -> CheckResult:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            return CheckResult("port", False, f"cannot listen on {host}:{port}: {reason}")
    return CheckResult("port", True, f"{host}:{port} is free")


def _state_dir(path: Path) -> CheckResult:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".check-"):
            pass
    except OSError as exc:
        return CheckResult("state directory", False, f"{path}: {exc.strerror or exc}")
    free = os.statvfs(path)
    free_mib = free.f_bavail * free.f_frsize // (1024 * 1024)
    return CheckResult("state directory", True, f"{path} is writable ({free_mib} MiB free)")


def format_results(results: list[CheckResult]) -> str:
    lines = [f"{'ok ' if r.ok else 'FAIL'} {r.name}: {r.detail}" for r in results]
    verdict = "all checks passed" if all(r.ok for r in results) else "some checks failed"
    return "\n".join([*lines, verdict])
