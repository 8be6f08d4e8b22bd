"""Which backend serves the model: llama.cpp on CPU, vLLM when a CUDA GPU can take it.

``auto`` picks vLLM only when everything it needs is there (a visible CUDA GPU,
vLLM installed, an ``[hf]`` artifact in the manifest) and says why in one line
either way. An explicit choice that cannot start is an error at start, never a
silent fallback to the other backend.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from edge_agent.config import Settings
from edge_agent.engine.hardware import GpuInfo, probe_gpu
from edge_agent.engine.types import Backend
from edge_agent.manifest import ModelManifest

BackendName = Literal["llamacpp", "vllm"]
# Builds the backend for a model: the daemon's start and every model swap go through one.
BackendFactory = Callable[[Settings, ModelManifest], Backend]

log = structlog.get_logger(__name__)


class BackendChoiceError(Exception):
    """The configured backend cannot serve this model on this box; the message says why."""


@dataclass(frozen=True, slots=True)
class BackendChoice:
    name: BackendName
    reason: str  # one line for the start-up log
    gpu: GpuInfo | None = None


def vllm_installed() -> bool:
    """Whether vLLM can be imported, without importing it (that costs torch and CUDA)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def choose_backend(
    settings_backend: str,
    manifest: ModelManifest,
    *,
    gpu_probe: Callable[[], GpuInfo | None] = probe_gpu,
    vllm_importable: Callable[[], bool] = vllm_installed,
) -> BackendChoice:
    """The backend for ``settings.backend`` (auto, llamacpp or vllm) and this model."""
    if settings_backend == "llamacpp":
        if manifest.gguf is None:
            raise BackendChoiceError(
                f"backend llamacpp: model {manifest.name!r} has no [gguf] artifact"
            )
        return BackendChoice("llamacpp", "backend = llamacpp in settings")
    if settings_backend not in ("auto", "vllm"):
        raise BackendChoiceError(f"unknown backend {settings_backend!r}")

    gpu = gpu_probe()
    missing = []
    if gpu is None:
        missing.append("no CUDA GPU visible")
    if not vllm_importable():
        missing.append("vllm is not installed (pip install 'edge-agent[gpu]')")
    if manifest.hf is None:
        missing.append(f"model {manifest.name!r} has no [hf] artifact")

    if not missing:
        assert gpu is not None
        origin = "backend = vllm in settings" if settings_backend == "vllm" else "auto"
        return BackendChoice("vllm", f"{origin}: vLLM on {gpu.describe()}", gpu)
    if settings_backend == "vllm":
        raise BackendChoiceError("backend vllm cannot start: " + "; ".join(missing))
    if manifest.gguf is None:
        raise BackendChoiceError(
            f"model {manifest.name!r} has only an [hf] artifact, which needs vLLM, but "
            + "; ".join(missing)
        )
    return BackendChoice("llamacpp", "auto: llama.cpp on CPU, " + "; ".join(missing), gpu)


def build_backend(choice: BackendChoice, manifest: ModelManifest, settings: Settings) -> Backend:
    """The chosen backend, constructed but not started (``start`` loads the model)."""
    if choice.name == "vllm":
        from edge_agent.engine.backends.vllm import VllmBackend

        return VllmBackend(
            manifest,
            settings.vllm,
            context_length=settings.context_size or manifest.context_length,
            parallel=settings.parallel,
            prefix_cache=settings.prefix_cache,
        )
    # Imported here so a GPU box without llama-cpp-python still starts vLLM.
    from edge_agent.engine.backends.llamacpp import LlamaCppBackend
    from edge_agent.engine.backends.llamacpp_process import LlamaCppProcessBackend, RestartPolicy
    from edge_agent.engine.backends.llamacpp_speculation import SpeculationOptions

    engine = settings.engine
    options: dict[str, Any] = {
        "context_length": settings.context_size or manifest.context_length,
        "parallel": settings.parallel,
        "threads": settings.threads,
        "prefix_cache": settings.prefix_cache,
        "kv_cache_type": settings.kv_cache_type,
        "expected_sha256": manifest.gguf.sha256 if manifest.gguf else None,
        "cpu_repack": settings.cpu_repack,
        "probe_cache": engine.probe_cache_path(),
        "embedding_max_tokens": manifest.embedding.max_input_tokens,
        "embedding_sequences": manifest.embedding.batch_inputs,
        "embedding_gguf": manifest.embedding_gguf_path(),
        "embedding_sha256": manifest.embedding.gguf.sha256 if manifest.embedding.gguf else None,
        "speculation": SpeculationOptions(
            mode=settings.speculative.mode,
            max_draft=settings.speculative.max_draft,
            min_ngram=settings.speculative.min_ngram,
            max_ngram=settings.speculative.max_ngram,
            verify_cost=settings.speculative.verify_cost,
        ),
    }
    if not engine.isolated:
        return LlamaCppBackend(manifest.gguf_path(), **options)
    policy = RestartPolicy(
        backoff_s=engine.restart_backoff_s,
        max_backoff_s=engine.max_restart_backoff_s,
        crash_window_s=engine.crash_window_s,
        crashes_before_fallback=engine.crashes_before_fallback,
        stall_s=engine.stall_s,
    )
    return LlamaCppProcessBackend(
        manifest.gguf_path(), policy=policy, log_format=settings.log_format, **options
    )


def backend_for(settings: Settings, manifest: ModelManifest) -> Backend:
    """vLLM on a CUDA box that has it, llama.cpp otherwise; one log line says which and why."""
    choice = choose_backend(settings.backend, manifest)
    log.info("backend_chosen", model=manifest.name, backend=choice.name, reason=choice.reason)
    return build_backend(choice, manifest, settings)
