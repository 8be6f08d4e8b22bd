"""Engine options for tests that drive the llama.cpp engine in the test process."""

from __future__ import annotations

from typing import Any

from edge_agent.engine.backends.llamacpp_config import CONFIGS
from edge_agent.engine.backends.llamacpp_engine import EngineOptions
from edge_agent.manifest import ModelManifest


def engine_options(manifest: ModelManifest, **overrides: Any) -> EngineOptions:
    """The default model on ggml's own kernels, 2 threads; ``overrides`` change the rest."""
    settings: dict[str, Any] = {
        "gguf_path": manifest.gguf_path(),
        "context_length": 1024,
        "parallel": 4,
        "threads": 2,
        "n_batch": 512,
        "prefix_cache": True,
        "config": CONFIGS["no_repack"],
    }
    return EngineOptions(**{**settings, **overrides})
