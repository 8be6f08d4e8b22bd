"""`edge-agent check`: what an operator (or install.sh) verifies before starting the service.

Each check says in one line what it found, so a failed install names its own fix.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.config import ConfigError, Settings, load_settings
from edge_agent.engine.backend_choice import BackendChoiceError, choose_backend
from edge_agent.manifest import ManifestError, ModelManifest, sha256_of
from edge_agent.model_store import serving_manifest


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def check_config(path: Path | None, **overrides: Any) -> tuple[CheckResult, Settings | None]:
    """Load the settings as ``serve`` would; on failure, the ConfigError's one line."""
    try:
        settings = load_settings(path, **overrides)
    except ConfigError as exc:
        return CheckResult("config", False, str(exc)), None
    return CheckResult("config", True, f"{path or 'defaults'}: settings are valid"), settings


def run_checks(settings: Settings, *, check_port: bool = True) -> list[CheckResult]:
    """Every check for loaded settings; ``check_port=False`` when the service already holds it."""
    results = [CheckResult("config", True, "settings are valid")]
    results += _checks_after_config(settings, check_port=check_port)
    return results


def run_checks_for_config(
    path: Path | None, *, check_port: bool = True, **overrides: Any
) -> list[CheckResult]:
    """``check_config`` then, if the settings load, the rest of ``run_checks``."""
    config, settings = check_config(path, **overrides)
    if settings is None:
        return [config]
    return [config, *_checks_after_config(settings, check_port=check_port)]


def _checks_after_config(settings: Settings, *, check_port: bool) -> list[CheckResult]:
    results: list[CheckResult] = []
    manifest = _manifest(settings, results)
    if manifest is not None:
        weights = _weights(manifest)
        results.append(weights)
        backend, serves_llamacpp = _backend(settings, manifest)
        results.append(backend)
        if weights.ok and backend.ok and serves_llamacpp:
            results.append(check_engine(settings, manifest))
    if check_port:
        results.append(_port(settings.host, settings.port))
    results.append(_state_dir(settings.state_dir))
    return results


def _manifest(settings: Settings, results: list[CheckResult]) -> ModelManifest | None:
    try:
        manifest = serving_manifest(settings)
    except ManifestError as exc:
        results.append(CheckResult("model manifest", False, str(exc)))
        return None
    results.append(CheckResult("model manifest", True, f"{manifest.name} ({manifest.source})"))
    return manifest


def _weights(manifest: ModelManifest) -> CheckResult:
    if manifest.gguf is None:
        assert manifest.hf is not None
        present = manifest.hf.path.is_dir()
        state = "present" if present else "missing"
        return CheckResult("model weights", present, f"vLLM directory {manifest.hf.path} {state}")
    try:
        path = manifest.gguf_path()
    except ManifestError as exc:
        return CheckResult("model weights", False, str(exc))
    if not path.is_file():
        return CheckResult("model weights", False, f"missing: {path}")
    try:
        digest = sha256_of(path)  # hashed in chunks: weights can be larger than memory
    except OSError as exc:
        return CheckResult("model weights", False, f"cannot read {path}: {exc.strerror or exc}")
    if digest != manifest.gguf.sha256:
        return CheckResult(
            "model weights",
            False,
            f"{path}: sha256 {digest}, manifest says {manifest.gguf.sha256} "
            "(a partial copy or other weights)",
        )
    return CheckResult("model weights", True, f"{path} (sha256 matches)")


def _backend(settings: Settings, manifest: ModelManifest) -> tuple[CheckResult, bool]:
    """The backend serve would choose, and whether it is llama.cpp."""
    # The same choice serve makes: vLLM needs it importable, a CUDA GPU and an [hf]
    # artifact; an explicit choice that cannot start fails here rather than at start.
    try:
        choice = choose_backend(settings.backend, manifest)
    except BackendChoiceError as exc:
        return CheckResult("backend", False, str(exc)), False
    if choice.name == "llamacpp":
        try:
            import llama_cpp
        except ImportError as exc:
            detail = f"llama-cpp-python does not import ({exc}): install edge-agent[cpu]"
            return CheckResult("backend", False, detail), True
        detail = f"{choice.reason} (llama-cpp-python {llama_cpp.__version__})"
        return CheckResult("backend", True, detail), True
    return CheckResult("backend", True, choice.reason), False


def check_engine(settings: Settings, manifest: ModelManifest) -> CheckResult:
    """The CPU configuration serve would use, proved by decoding in probe processes.

    A build that imports is not a build that works: this decodes a few tokens under each
    configuration it needs to (a crash costs only the probe) and caches the verdict.
    """
    from edge_agent.engine.backends.llamacpp_config import ladder
    from edge_agent.engine.backends.llamacpp_probe import VerdictCache, select_config

    assert manifest.gguf is not None
    verdict = select_config(
        ladder(settings.cpu_repack),
        gguf=manifest.gguf_path(),
        gguf_sha256=manifest.gguf.sha256,
        threads=settings.threads or os.cpu_count() or 1,
        cache=VerdictCache(settings.engine.probe_cache_path()),
    )
    if verdict.config is None:
        detail = (
            f"{verdict.reason}. This llama.cpp build does not decode on this CPU: rebuild "
            "llama-cpp-python for a generic x86-64 CPU (CMAKE_ARGS='-DGGML_NATIVE=OFF "
            '-DGGML_LLAMAFILE=OFF\'), and if only the repacked path fails set cpu_repack = "off"'
        )
        return CheckResult("engine", False, detail)
    cached = " (verdict cached for this build and CPU)" if verdict.cached else ""
    return CheckResult("engine", True, verdict.reason + cached)


def _port(host: str, port: int) -> CheckResult:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the server binds: TIME_WAIT leftovers of a previous run do not count as in use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "in use by another program" if exc.errno == errno.EADDRINUSE else exc.strerror
            return CheckResult("port", False, f"cannot listen on {host}:{port}: {reason}")
    return CheckResult("port", True, f"{host}:{port} is free")


def _state_dir(path: Path) -> CheckResult:
    """Writable if it exists; creatable if not. A check creates nothing that serve would."""
    if path.exists():
        if not path.is_dir():
            return CheckResult("state directory", False, f"{path}: exists and is not a directory")
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".check-"):
                pass
        except OSError as exc:
            return CheckResult("state directory", False, f"{path}: not writable: {exc.strerror}")
        free = os.statvfs(path)
        free_mib = free.f_bavail * free.f_frsize // (1024 * 1024)
        return CheckResult("state directory", True, f"{path} is writable ({free_mib} MiB free)")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return CheckResult(
            "state directory", False, f"{path}: cannot be created: {parent} is not a directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=True):
        return CheckResult(
            "state directory", False, f"{path}: cannot be created: {parent} is not writable"
        )
    return CheckResult("state directory", True, f"{path} does not exist yet and can be created")


def all_ok(results: list[CheckResult]) -> bool:
    return all(r.ok for r in results)


def exit_code(results: list[CheckResult]) -> int:
    """0 only when every check passed."""
    return 0 if all_ok(results) else 1


def format_results(results: list[CheckResult]) -> str:
    lines = [f"{'ok  ' if r.ok else 'FAIL'} {r.name}: {r.detail}" for r in results]
    verdict = "all checks passed" if all_ok(results) else "some checks failed"
    return "\n".join([*lines, verdict])
