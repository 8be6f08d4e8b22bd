"""A second real model for swap tests: the default model requantized with llama.cpp's API.

Q4_1 to Q4_0 changes every weight block, so the file, its sha256, its version and its
greedy text all differ from the default model's, while the tokenizer stays the same.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from edge_agent.manifest import ModelManifest, sha256_of

SECOND_NAME = "smollm2-135m-q4_0"


def requantize(source: Path, target: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = 2
    partial = target.with_suffix(".partial")
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(partial).encode(), ctypes.byref(params)
    )
    if status != 0:
        raise RuntimeError(f"llama_model_quantize returned {status}")
    partial.rename(target)


def write_manifest(
    directory: Path,
    name: str,
    gguf: Path,
    sha256: str,
    *,
    canary_sha256: str | None = None,
) -> Path:
    lines = [f'name = "{name}"', "context_length = 4096", "", "[gguf]"]
    lines += [f'path = "{gguf}"', f'sha256 = "{sha256}"']
    if canary_sha256 is not None:
        lines += ["", "[canary]", f'sha256 = "{canary_sha256}"']
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_second_model(directory: Path, default: ModelManifest) -> Path:
    """The second model's manifest, in ``directory`` beside its GGUF."""
    directory.mkdir(parents=True, exist_ok=True)
    gguf = directory / f"{SECOND_NAME}.gguf"
    if not gguf.is_file():
        requantize(default.gguf_path(), gguf)
    return write_manifest(directory, SECOND_NAME, gguf, sha256_of(gguf))
