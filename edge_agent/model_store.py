"""The box's model library: models installed into the state directory, and which one serves.

``edge-agent models install`` copies a model's weights into ``<state_dir>/models/<name>/``,
checking their sha256 as they are copied, and writes ``<state_dir>/models/<name>.toml``
beside them, so a model the box was given stays on it (for a swap back) whatever happens
to the file it came from. Which model serves is the configured ``model``, unless a swap
asked for another since that value was set (the pin, ``active-model.json``): the latest
instruction wins, across restarts too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
import tomli_w

from edge_agent.config import Settings
from edge_agent.manifest import ManifestError, ModelManifest, find_manifest, load_manifest

log = structlog.get_logger(__name__)

MODELS_SUBDIR = "models"
PIN_FILE = "active-model.json"
SWAP_OUTCOME_FILE = "model-swap.json"
PID_FILE = "edge-agent.pid"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


class InstallError(Exception):
    """A model that cannot be installed; the message is one line."""


def installed_dir(state_dir: Path) -> Path:
    return state_dir / MODELS_SUBDIR


def find_model(name_or_path: str, state_dir: Path) -> ModelManifest:
    """A manifest by path or name, the installed models first."""
    return load_manifest(name_or_path, installed_dir(state_dir))


@dataclass(frozen=True, slots=True)
class InstalledModel:
    name: str
    manifest: Path
    gguf: Path
    sha256: str
    bytes: int


def install(
    source: str,
    state_dir: Path,
    *,
    name: str | None = None,
    sha256: str | None = None,
    context_length: int | None = None,
) -> InstalledModel:
    """Copy a model (a manifest, or a bare GGUF file) into the state directory's library.

    A manifest's own sha256 is checked against the copy; for a bare GGUF, ``sha256`` is
    checked when given and recorded either way.
    """
    path = Path(source)
    if path.suffix == ".gguf" or (path.is_file() and path.suffix != ".toml"):
        if not path.is_file():
            raise InstallError(f"GGUF file not found: {path}")
        name = name or _slug(path.stem)
        data: dict[str, Any] = {"name": name, "context_length": context_length or 4096}
        weights, expected = path, sha256
    else:
        try:
            manifest = load_manifest(source, installed_dir(state_dir))
            manifest_file = find_manifest(source, installed_dir(state_dir))
            weights = manifest.gguf_path()
        except ManifestError as exc:
            raise InstallError(str(exc)) from None
        if manifest.embedding.gguf is not None:
            raise InstallError("installing a model with a separate embedding model is not done yet")
        with manifest_file.open("rb") as handle:
            data = tomllib.load(handle)
        name = name or manifest.name
        data["name"] = name
        if context_length is not None:
            data["context_length"] = context_length
        if manifest.hf is not None and not manifest.hf.path.is_absolute():
            data["hf"]["path"] = str((manifest_file.parent / manifest.hf.path).resolve())
        expected = manifest.sha256
        if sha256 is not None and sha256 != expected:
            raise InstallError(f"--sha256 {sha256} differs from the manifest's {expected}")
    if not _NAME.match(name):
        raise InstallError(f"model name {name!r}: use lowercase letters, digits, '.', '_', '-'")
    if not weights.is_file():
        raise InstallError(f"model file not found: {weights}")
    library = installed_dir(state_dir)
    target = library / name / weights.name
    digest = _copy_checked(weights, target, expected)
    data["gguf"] = {"path": f"{name}/{weights.name}", "sha256": digest}
    manifest_path = library / f"{name}.toml"
    _write_atomic(manifest_path, tomli_w.dumps(data).encode())
    # Read back through the loader: what was written is a manifest the daemon takes.
    load_manifest(str(manifest_path))
    return InstalledModel(name, manifest_path, target, digest, target.stat().st_size)


def _copy_checked(source: Path, target: Path, expected: str | None) -> str:
    """Copy, hashing what is written; a copy whose digest is not ``expected`` is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with source.open("rb") as reader, partial.open("wb") as writer:
        while block := reader.read(1 << 20):
            digest.update(block)
            writer.write(block)
        writer.flush()
        os.fsync(writer.fileno())
    found = digest.hexdigest()
    if expected is not None and found != expected:
        partial.unlink()
        raise InstallError(
            f"{source} has sha256 {found}, expected {expected} (a partial copy or other weights)"
        )
    partial.replace(target)
    return found


def _slug(stem: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"


def _write_atomic(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def installed_models(state_dir: Path) -> list[Path]:
    return sorted(installed_dir(state_dir).glob("*.toml"))


def remove_installed(name: str, state_dir: Path) -> None:
    library = installed_dir(state_dir)
    (library / f"{name}.toml").unlink(missing_ok=True)
    shutil.rmtree(library / name, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class ModelPin:
    """A swap's choice of model, and the configured ``model`` it was made against."""

    model: str
    config_model: str
    previous: str | None = None


def read_pin(state_dir: Path) -> ModelPin | None:
    try:
        data = json.loads((state_dir / PIN_FILE).read_text(encoding="utf-8"))
        return ModelPin(str(data["model"]), str(data["config_model"]), data.get("previous") or None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_pin(state_dir: Path, pin: ModelPin) -> None:
    _write_atomic(state_dir / PIN_FILE, json.dumps(asdict(pin)).encode())


def clear_pin(state_dir: Path) -> None:
    (state_dir / PIN_FILE).unlink(missing_ok=True)


def desired_model(config_model: str, pin: ModelPin | None) -> str:
    """The model to serve: the pin's, unless ``model`` in the config changed after it."""
    if pin is not None and pin.config_model == config_model:
        return pin.model
    return config_model


def serving_manifest(settings: Settings) -> ModelManifest:
    """The model to serve: the configured one, or the one a swap chose since (the pin)."""
    wanted = desired_model(settings.model, read_pin(settings.state_dir))
    if wanted != settings.model:
        try:
            return find_model(wanted, settings.state_dir)
        except ManifestError as exc:
            log.warning("swapped_model_missing", model=wanted, error=str(exc))
    return find_model(settings.model, settings.state_dir)


@dataclass(frozen=True, slots=True)
class SwapOutcome:
    """How the last swap ended, as ``edge-agent models use`` waits for it."""

    serial: int
    model: str
    ok: bool
    detail: str
    origin: str
    time: float


def read_swap_outcome(state_dir: Path) -> SwapOutcome | None:
    try:
        data = json.loads((state_dir / SWAP_OUTCOME_FILE).read_text(encoding="utf-8"))
        return SwapOutcome(**data)
    except (OSError, ValueError, TypeError):
        return None


def write_swap_outcome(state_dir: Path, model: str, ok: bool, detail: str, origin: str) -> None:
    last = read_swap_outcome(state_dir)
    outcome = SwapOutcome(
        (last.serial if last else 0) + 1, model, ok, detail, origin, round(time.time(), 3)
    )
    _write_atomic(state_dir / SWAP_OUTCOME_FILE, json.dumps(asdict(outcome)).encode())


def write_pid(state_dir: Path) -> None:
    _write_atomic(state_dir / PID_FILE, f"{os.getpid()}\n".encode())


def remove_pid(state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        if (state_dir / PID_FILE).read_text().strip() == str(os.getpid()):
            (state_dir / PID_FILE).unlink()


def running_daemon(state_dir: Path) -> int | None:
    """The pid of the daemon serving from this state directory, if one is alive."""
    try:
        pid = int((state_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:
        return pid  # alive, and another user's: the caller's signal will say so
    except OSError:
        return None
    return pid
