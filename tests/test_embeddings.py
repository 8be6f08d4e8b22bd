"""POST /infer/openai/v1/embeddings with the real model: the openai SDK, errors, the record."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from edge_agent.engine.backend_choice import BackendChoice, build_backend
from edge_agent.engine.backends.llamacpp_embed import batches
from edge_agent.manifest import ModelManifest, load_manifest
from edge_agent.server.app import create_app, wait_until_loaded
from edge_agent.server.state import STATE_KEY
from tests.conftest import Daemon, RecordingSink, make_settings

MODEL = "smollm2-135m-instruct"
PATH = "/infer/openai/v1/embeddings"
JSON = "application/json"
WIDTH = 576  # SmolLM2-135M's hidden size: its vector length
slow = pytest.mark.slow  # against the session's daemon subprocess
TEXTS = [
    "The conveyor on line 3 stopped.",
    "Temperature in the oven rose above the limit.",
    "hello",
    "A longer sentence about the pallets waiting in the loading bay for the afternoon truck.",
    "ok",
]


def sdk(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/infer/openai/v1", api_key="none", max_retries=0)


def vectors(response: Any) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float64)


# --- packing inputs into batches (no model) ------------------------------------------------


def test_batches_keep_order_and_bounds() -> None:
    inputs = [[1] * 5, [1] * 5, [1] * 3, [1] * 8, [1], [1], [1]]
    packed = list(batches(inputs, max_tokens=10, max_sequences=2))
    assert packed == [[0, 1], [2], [3, 4], [5, 6]]
    for group in packed:
        assert sum(len(inputs[i]) for i in group) <= 10 and len(group) <= 2


# --- the openai SDK against a real daemon --------------------------------------------------


@slow
def test_sdk_float_vectors_have_openais_shape(daemon: Daemon) -> None:
    response = sdk(daemon).embeddings.create(
        model="dummy", input=TEXTS[:2], encoding_format="float"
    )
    assert response.object == "list" and response.model == MODEL
    assert [item.index for item in response.data] == [0, 1]
    assert all(item.object == "embedding" for item in response.data)
    matrix = vectors(response)
    assert matrix.shape == (2, WIDTH)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    assert response.usage.prompt_tokens > 2
    assert response.usage.total_tokens == response.usage.prompt_tokens


@slow
def test_sdk_default_base64_decodes_to_the_float_vectors(daemon: Daemon) -> None:
    client = sdk(daemon)
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    decoded = vectors(client.embeddings.create(model="", input=TEXTS[0]))
    floats = vectors(client.embeddings.create(model="", input=TEXTS[0], encoding_format="float"))
    np.testing.assert_array_equal(decoded, floats.astype(np.float32).astype(np.float64))
    raw = client.embeddings.create(model="", input=TEXTS[0], encoding_format="base64")
    text = raw.data[0].embedding
    assert isinstance(text, str)
    from_b64 = np.frombuffer(base64.b64decode(text), dtype="<f4")
    np.testing.assert_array_equal(from_b64, decoded[0])


@slow
def test_the_same_text_gives_the_same_vector(daemon: Daemon) -> None:
    client = sdk(daemon)
    first = vectors(client.embeddings.create(model="", input=TEXTS[1], encoding_format="float"))
    again = vectors(client.embeddings.create(model="", input=TEXTS[1], encoding_format="float"))
    np.testing.assert_array_equal(first, again)
    other = vectors(client.embeddings.create(model="", input=TEXTS[2], encoding_format="float"))
    assert float(first[0] @ other[0]) < 0.9999  # different text, different direction


@slow
def test_a_batch_gives_the_vectors_of_one_by_one(daemon: Daemon) -> None:
    client = sdk(daemon)
    together = vectors(client.embeddings.create(model="", input=TEXTS, encoding_format="float"))
    alone = np.vstack(
        [
            vectors(client.embeddings.create(model="", input=text, encoding_format="float"))
            for text in TEXTS
        ]
    )
    np.testing.assert_allclose(together, alone, atol=1e-5)
    cosine = np.sum(together * alone, axis=1)
    np.testing.assert_allclose(cosine, 1.0, atol=1e-5)


@slow
def test_models_list_names_the_model_that_embeds(daemon: Daemon) -> None:
    assert [m.id for m in sdk(daemon).models.list().data] == [MODEL]


@slow
@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        pytest.param({"input": "hi", "dimensions": 64}, "dimensions", None, id="dimensions"),
        pytest.param({"input": ""}, "input", None, id="empty-string"),
        pytest.param({"input": []}, "input", None, id="empty-list"),
        pytest.param({"input": [[]]}, "input", None, id="empty-token-list"),
        pytest.param({"input": [10**7]}, "input", None, id="token-outside-vocab"),
        pytest.param({"input": [-1]}, "input", None, id="negative-token"),
        pytest.param({"input": 5}, "input", None, id="not-text"),
        pytest.param({"input": "hi", "encoding_format": "int8"}, "encoding_format", None, id="fmt"),
        pytest.param(
            {"input": "word " * 600}, "input", "context_length_exceeded", id="input-too-long"
        ),
        pytest.param({}, "input", None, id="no-input"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(
    daemon: Daemon, body: dict[str, Any], param: str, code: str | None
) -> None:
    status, answer = daemon.post_json(PATH, body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    assert answer["error"]["code"] == code


@slow
def test_the_models_own_dimensions_are_accepted(daemon: Daemon) -> None:
    status, answer = daemon.post_json(PATH, {"input": "hi", "dimensions": WIDTH})
    assert status == 200, answer
    assert len(answer["data"][0]["embedding"]) == WIDTH


# --- token ids, the record, other backends, in process ---------------------------------------


async def post(client: Any, body: Any) -> tuple[int, dict[str, Any]]:
    response = await client.post(PATH, data=json.dumps(body), headers={"Content-Type": JSON})
    return response.status, await response.json()


async def test_token_ids_embed_like_their_text(make_client: Callable[..., Any]) -> None:
    client = await make_client()
    status, by_text = await post(client, {"input": TEXTS[3]})
    assert status == 200
    tokens = by_text["usage"]["prompt_tokens"]
    ids = client.app[STATE_KEY].backend.tokenize_for_embedding(TEXTS[3])
    assert len(ids) == tokens
    status, by_ids = await post(client, {"input": ids})
    assert status == 200, by_ids
    status, by_lists = await post(client, {"input": [ids, ids[:3]]})
    assert status == 200, by_lists
    assert by_lists["usage"]["prompt_tokens"] == tokens + 3
    np.testing.assert_array_equal(by_text["data"][0]["embedding"], by_ids["data"][0]["embedding"])
    np.testing.assert_allclose(
        by_text["data"][0]["embedding"], by_lists["data"][0]["embedding"], atol=1e-5
    )


async def test_each_request_leaves_one_record_without_its_vectors(
    make_client: Callable[..., Any],
) -> None:
    sink = RecordingSink()
    client = await make_client(records=sink)
    status, _ = await post(client, {"input": "hi", "dimensions": 3})
    assert status == 400
    status, answer = await post(client, {"input": TEXTS[:3], "model": "x", "user": "u1"})
    assert status == 200
    refused, record = sink.records
    assert refused["endpoint"] == "embeddings" and refused["status"] == "error"
    assert "dimensions" in refused["error"]
    assert record["endpoint"] == "embeddings" and record["status"] == "ok"
    assert record["in"]["input"] == TEXTS[:3]
    assert record["params"] == {"encoding_format": "float", "dimensions": None}
    assert record["metrics"]["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    logged = json.loads(record["out"]["json"])
    assert [item["embedding"] for item in logged["data"]] == [[], [], []]
    assert logged["usage"] == answer["usage"] and logged["model"] == MODEL


async def test_the_vllm_backend_refuses_embeddings_with_a_400(
    make_client: Callable[..., Any],
) -> None:
    sink = RecordingSink()
    client = await make_client(backend="vllm", records=sink)
    status, answer = await post(client, {"input": "hi"})
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert "embeddings" in answer["error"]["message"]
    assert [r["status"] for r in sink.records] == ["error"]


async def test_embeddings_are_refused_with_openai_off(make_client: Callable[..., Any]) -> None:
    client = await make_client(openai_enabled=False, wait=False)
    status, answer = await post(client, {"input": "hi"})
    assert status == 400
    assert answer["error"]["message"].startswith("Inference failed. Please apply")


async def test_a_separate_embedding_model_serves_beside_the_chat_model(
    aiohttp_client: Any, manifest: ModelManifest, tmp_path: Path
) -> None:
    # The default model's own GGUF stands in for an embedding model: a second set of
    # weights in the engine process, its own tokenizer and id, and the chat model beside it.
    gguf = manifest.gguf
    assert gguf is not None and gguf.package is not None
    weights = f'package = "{gguf.package}"\nfile = "{gguf.file}"\nsha256 = "{gguf.sha256}"\n'
    path = tmp_path / "with-embedder.toml"
    path.write_text(
        f'name = "{MODEL}"\n[gguf]\n{weights}'
        f'[embedding]\nname = "embedder"\n[embedding.gguf]\n{weights}'
    )
    separate = load_manifest(str(path))
    settings = make_settings(tmp_path, parallel=1)
    backend = build_backend(BackendChoice("llamacpp", "tests"), separate, settings)
    app = create_app(settings, separate, backend)
    client = await aiohttp_client(app)
    await wait_until_loaded(app)

    models = await (await client.get("/infer/openai/v1/models")).json()
    assert [card["id"] for card in models["data"]] == [MODEL, "embedder"]
    status, answer = await post(client, {"input": TEXTS[:2]})
    assert status == 200, answer
    assert answer["model"] == "embedder"
    matrix = np.array([item["embedding"] for item in answer["data"]])
    assert matrix.shape == (2, WIDTH)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    chat = await client.post(
        "/infer/openai/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert chat.status == 200 and (await chat.json())["model"] == MODEL
