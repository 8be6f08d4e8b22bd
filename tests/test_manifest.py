"""Model manifests: the product's key names for the OpenAI defaults, and what they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.manifest import ManifestError, load_manifest
from edge_agent.server.params import model_defaults

WEIGHTS = 'name = "m"\n[gguf]\npath = "m.gguf"\nsha256 = "' + "0" * 64 + '"\n'


def manifest_file(tmp_path: Path, openai: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(WEIGHTS + openai)
    return path


def test_product_key_names_set_each_endpoints_defaults(tmp_path: Path) -> None:
    manifest = load_manifest(
        str(
            manifest_file(
                tmp_path,
                "[openai.completion_config]\nmax_tokens = 7\n"
                "[openai.chat_completion_config]\nmax_tokens = 9\n",
            )
        )
    )
    assert model_defaults(manifest, "completions").max_tokens == 7
    assert model_defaults(manifest, "chat/completions").max_tokens == 9


def test_chat_config_is_still_read_as_chat_completion_config(tmp_path: Path) -> None:
    path = manifest_file(tmp_path, "[openai.chat_config]\ntemperature = 0.25\n")
    manifest = load_manifest(str(path))
    assert model_defaults(manifest, "chat/completions").temperature == 0.25


@pytest.mark.parametrize("table", ["completion_config", "chat_completion_config", "chat_config"])
def test_stream_in_a_models_defaults_fails_the_load_with_one_line(
    tmp_path: Path, table: str
) -> None:
    path = manifest_file(tmp_path, f"[openai.{table}]\nstream = true\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert f"openai.{table}" in message and "stream cannot be configured" in message


def test_a_separate_embedding_model_is_named_and_resolved(tmp_path: Path) -> None:
    path = manifest_file(
        tmp_path,
        '[embedding]\nname = "embedder"\n'
        '[embedding.gguf]\npath = "e.gguf"\nsha256 = "' + "1" * 64 + '"\n',
    )
    manifest = load_manifest(str(path))
    assert manifest.embedding_model == "embedder"
    assert manifest.embedding_gguf_path() == tmp_path / "e.gguf"


def test_without_one_the_model_embeds_under_its_own_name(tmp_path: Path) -> None:
    manifest = load_manifest(str(manifest_file(tmp_path, "")))
    assert manifest.embedding_model == "m" and manifest.embedding_gguf_path() is None


def test_a_separate_embedding_model_needs_a_name(tmp_path: Path) -> None:
    path = manifest_file(
        tmp_path, '[embedding.gguf]\npath = "e.gguf"\nsha256 = "' + "1" * 64 + '"\n'
    )
    with pytest.raises(ManifestError, match="needs both name and"):
        load_manifest(str(path))


def test_the_shipped_manifest_uses_the_product_key_names() -> None:
    manifest = load_manifest("smollm2-135m-instruct")
    assert manifest.openai.chat_completion_config["max_tokens"] == 256
    assert manifest.embedding.enabled
