"""All of the engine's llama.cpp compute runs on its decode thread (llamacpp_batch).

With llama.cpp's OpenMP build a second computing thread makes every decode of the
first sleep at ggml's barriers; these pin that the self-check and embeddings go
through the decode thread, and that work queued for it never hangs its caller.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import pytest

from edge_agent.engine.backends.llamacpp_batch import StepOutput
from edge_agent.engine.backends.llamacpp_engine import LlamaCppEngine
from edge_agent.engine.types import BackendError
from edge_agent.manifest import ModelManifest
from tests.engine.local_engine import engine_options


@pytest.fixture(scope="module")
def engine(manifest: ModelManifest) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(engine_options(manifest, context_length=512, parallel=2))
    engine.load()
    outputs: queue.SimpleQueue[StepOutput] = queue.SimpleQueue()
    check = engine.start(outputs.put)
    assert check.passed, check
    yield engine
    engine.close()


def test_work_for_the_engine_runs_on_the_decode_thread(engine: LlamaCppEngine) -> None:
    assert engine.loop is not None
    name = engine.loop.call(lambda: threading.current_thread().name).result(timeout=30)
    assert name == "llamacpp-decode"
    assert name != threading.current_thread().name


def test_embeddings_are_computed_by_the_decode_thread(
    engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert engine.embedder is not None and engine.vocab is not None
    seen: list[str] = []
    embed = engine.embedder.embed

    def observed(inputs: object) -> list[tuple[float, ...]]:
        seen.append(threading.current_thread().name)
        return embed(inputs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.embedder, "embed", observed)
    tokens = engine.vocab.tokenize("a pump on line 3", add_special=True, parse_special=False)
    [vector] = engine.embed([tokens]).result(timeout=60)
    assert seen == ["llamacpp-decode"]
    assert len(vector) > 0 and abs(sum(x * x for x in vector) - 1.0) < 1e-3


def test_a_failing_call_fails_its_caller_and_not_the_loop(engine: LlamaCppEngine) -> None:
    assert engine.loop is not None

    def broken() -> None:
        raise ValueError("not the loop's fault")

    with pytest.raises(ValueError, match="not the loop's fault"):
        engine.loop.call(broken).result(timeout=30)
    assert engine.loop.call(lambda: 42).result(timeout=30) == 42


def test_a_call_after_stop_fails_at_once(manifest: ModelManifest) -> None:
    engine = LlamaCppEngine(engine_options(manifest, context_length=256, parallel=1))
    engine.load()
    loop = engine.start_loop(lambda outputs: None)
    engine.close()
    with pytest.raises(BackendError, match="stopped"):
        loop.call(lambda: 1).result(timeout=5)
