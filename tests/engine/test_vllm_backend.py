"""The vLLM backend adapter against an engine double that follows vLLM's AsyncLLM interface."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import VllmOptions
from edge_agent.engine.backends.vllm import VllmBackend
from edge_agent.engine.types import (
    Backend,
    BackendError,
    ChatMessage,
    EngineRestarted,
    EngineUnavailable,
    GenerationRequest,
    SamplingParams,
    StructuredOutput,
    TokenEvent,
    TopLogprob,
    UnsupportedFeature,
)
from edge_agent.manifest import HfArtifact, ModelManifest
from tests.engine.vllm_double import (
    DOUBLE_JSON_REPLY,
    DOUBLE_REPLY,
    UNCOMPILABLE_SCHEMA_KEY,
    ByteTokenizer,
    DoubleAsyncLLM,
    VllmDouble,
    make_double_vllm_backend,
)


@pytest.fixture
def hf_manifest(tmp_path: Path) -> ModelManifest:
    (tmp_path / "weights").mkdir()
    return ModelManifest(
        name="tiny-hf",
        context_length=256,
        hf=HfArtifact(path=Path("weights")),
        source=tmp_path / "tiny-hf.toml",
    )


async def started(
    manifest: ModelManifest, options: VllmOptions | None = None, **engine_kwargs: Any
) -> tuple[VllmBackend, DoubleAsyncLLM]:
    double = VllmDouble(**engine_kwargs)
    backend = VllmBackend(manifest, options, parallel=3, api_loader=double.api)
    await backend.start()
    assert double.engine is not None
    return backend, double.engine


@pytest.fixture
async def backend(hf_manifest: ModelManifest) -> AsyncIterator[tuple[VllmBackend, DoubleAsyncLLM]]:
    pair = await started(hf_manifest)
    yield pair
    await pair[0].close()


def request(backend: VllmBackend, rid: str = "r1", **params: Any) -> GenerationRequest:
    prompt = backend.tokenize("Say hello.", add_special=True, parse_special=False)
    params.setdefault("max_tokens", 200)
    return GenerationRequest(rid, prompt, SamplingParams(**params))


async def collect(backend: VllmBackend, req: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in backend.generate(req)]


# --- streaming -------------------------------------------------------------------------------


async def test_reply_streams_one_event_per_token_and_ends_with_a_bare_stop(backend: Any) -> None:
    vllm_backend, _ = backend
    events = await collect(vllm_backend, request(vllm_backend))
    tokens, end = events[:-1], events[-1]
    assert end == TokenEvent(token_id=None, text="", finish_reason="stop")
    assert len(tokens) == len(DOUBLE_REPLY.encode())
    assert all(e.token_id is not None and e.finish_reason is None for e in tokens)
    assert "".join(e.text for e in events) == DOUBLE_REPLY


async def test_max_tokens_ends_on_the_last_token_with_length(backend: Any) -> None:
    vllm_backend, _ = backend
    events = await collect(vllm_backend, request(vllm_backend, max_tokens=5))
    assert [e.text for e in events] == list("Hello")
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]
    assert all(e.token_id is not None for e in events)


async def test_a_character_split_across_tokens_arrives_with_its_last_byte(backend: Any) -> None:
    vllm_backend, _ = backend
    events = await collect(vllm_backend, request(vllm_backend))
    texts = [e.text for e in events]
    first = texts.index("ï")
    assert texts[first - 1] == ""  # the first byte of ï: no text yet, still a token
    assert events[first - 1].token_id is not None


async def test_the_context_window_ends_the_sequence_with_length(hf_manifest: ModelManifest) -> None:
    vllm_backend, _ = await started(hf_manifest, VllmOptions(max_model_len=64))
    prompt = vllm_backend.tokenize("x" * 60, add_special=True, parse_special=False)
    events = await collect(
        vllm_backend, GenerationRequest("r", prompt, SamplingParams(max_tokens=100))
    )
    assert len(events) == 64 - len(prompt)
    assert events[-1].finish_reason == "length"


async def test_merged_deltas_still_give_one_event_per_token(hf_manifest: ModelManifest) -> None:
    vllm_backend, _ = await started(hf_manifest, tokens_per_output=4)
    events = await collect(vllm_backend, request(vllm_backend))
    assert len([e for e in events if e.token_id is not None]) == len(DOUBLE_REPLY.encode())
    assert "".join(e.text for e in events) == DOUBLE_REPLY
    assert events[-1] == TokenEvent(token_id=None, text="", finish_reason="stop")
    # Without per-token texts the earlier tokens of a merged delta carry none.
    assert [e.text for e in events[:4]] == ["", "", "", "Hell"]


async def test_merged_deltas_use_per_token_texts_when_logprobs_give_them(
    hf_manifest: ModelManifest,
) -> None:
    vllm_backend, _ = await started(hf_manifest, tokens_per_output=4)
    events = await collect(vllm_backend, request(vllm_backend, max_tokens=8, logprobs=0))
    assert [e.text for e in events] == list("Hello fr")
    assert events[-1].finish_reason == "length"


async def test_logprobs_give_the_chosen_token_and_its_alternatives(backend: Any) -> None:
    vllm_backend, _ = backend
    events = await collect(vllm_backend, request(vllm_backend, max_tokens=2, logprobs=3))
    first = events[0]
    assert first.logprob == -0.25
    assert [t.logprob for t in first.top_logprobs] == [-0.25, -2.0, -3.0]
    assert first.top_logprobs[0] == TopLogprob("H", -0.25)
    none = await collect(vllm_backend, request(vllm_backend, "r2", max_tokens=2))
    assert none[0].logprob is None and none[0].top_logprobs == ()


async def test_json_response_format_is_enforced_by_the_engine(backend: Any) -> None:
    vllm_backend, _ = backend
    structured = StructuredOutput("json_object")
    events = await collect(vllm_backend, request(vllm_backend, structured_output=structured))
    assert json.loads("".join(e.text for e in events)) == json.loads(DOUBLE_JSON_REPLY)


# --- parameter mapping -----------------------------------------------------------------------


async def test_sampling_parameters_reach_vllm_under_its_names(backend: Any) -> None:
    vllm_backend, engine = backend
    await collect(
        vllm_backend,
        request(
            vllm_backend,
            max_tokens=7,
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            seed=1234,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            repetition_penalty=1.1,
            logit_bias={ByteTokenizer.OFFSET + 65: 5.0},
            logprobs=2,
        ),
    )
    sent = engine.received["r1"]
    assert (sent.max_tokens, sent.temperature, sent.top_p, sent.top_k) == (7, 0.7, 0.9, 40)
    assert (sent.min_p, sent.seed) == (0.05, 1234)
    assert (sent.presence_penalty, sent.frequency_penalty) == (0.5, -0.5)
    assert sent.repetition_penalty == 1.1
    assert sent.logit_bias == {ByteTokenizer.OFFSET + 65: 5.0}
    assert sent.logprobs == 2
    assert sent.n == 1
    assert sent.output_kind == engine.classes["RequestOutputKind"].DELTA
    assert sent.structured_outputs is None
    assert list(engine.prompts["r1"]["prompt_token_ids"]) == list(
        vllm_backend.tokenize("Say hello.", add_special=True, parse_special=False)
    )


async def test_no_top_k_and_no_logit_bias_are_vllm_defaults(backend: Any) -> None:
    vllm_backend, engine = backend
    await collect(vllm_backend, request(vllm_backend, max_tokens=1, top_k=0))
    sent = engine.received["r1"]
    assert sent.top_k in (-1, 0)  # vLLM treats both as "no cut"; greedy resets to 0
    assert sent.logit_bias is None and sent.logprobs is None


async def test_response_formats_become_structured_outputs(backend: Any) -> None:
    vllm_backend, engine = backend
    schema = '{"type": "object", "properties": {"answer": {"type": "string"}}}'
    await collect(
        vllm_backend,
        request(vllm_backend, "a", max_tokens=1, structured_output=StructuredOutput("json_object")),
    )
    await collect(
        vllm_backend,
        request(
            vllm_backend,
            "b",
            max_tokens=1,
            structured_output=StructuredOutput("json_schema", schema),
        ),
    )
    assert engine.received["a"].structured_outputs.json_object is True
    assert engine.received["b"].structured_outputs.json == schema


@pytest.mark.parametrize(
    ("params", "feature"),
    [
        ({"temperature": 3.0}, "temperature"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"top_p": 0.0}, "top_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
        ({"structured_output": StructuredOutput("json_schema", "{not json")}, "structured_output"),
    ],
)
async def test_a_parameter_vllm_refuses_is_named(
    backend: Any, params: dict[str, Any], feature: str
) -> None:
    vllm_backend, _ = backend
    with pytest.raises(UnsupportedFeature) as caught:
        vllm_backend.check_supported(SamplingParams(max_tokens=4, **params))
    assert caught.value.feature == feature


async def test_a_schema_refused_at_admission_is_an_unsupported_structured_output(
    backend: Any,
) -> None:
    vllm_backend, engine = backend
    schema = json.dumps({"type": "object", UNCOMPILABLE_SCHEMA_KEY: True})
    req = request(vllm_backend, structured_output=StructuredOutput("json_schema", schema))
    vllm_backend.check_supported(req.params)  # compiling needs the engine: found at generate
    with pytest.raises(UnsupportedFeature) as caught:
        await collect(vllm_backend, req)
    assert caught.value.feature == "structured_output"
    assert engine.aborted == ["r1"]


# --- cancellation and failures ---------------------------------------------------------------


async def test_aclose_mid_stream_aborts_that_request_in_the_engine(backend: Any) -> None:
    vllm_backend, engine = backend
    stream = vllm_backend.generate(request(vllm_backend, "cancel-me"))
    assert (await anext(stream)).text == "H"
    await anext(stream)
    await stream.aclose()
    assert engine.aborted == ["cancel-me"]
    assert engine.running == set()


async def test_a_finished_sequence_is_not_aborted(backend: Any) -> None:
    vllm_backend, engine = backend
    await collect(vllm_backend, request(vllm_backend, max_tokens=3))
    assert engine.aborted == []


async def test_an_engine_failure_mid_stream_is_a_backend_error(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    vllm_backend, engine = backend

    async def broken(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise RuntimeError("EngineCore died")
        yield  # pragma: no cover

    monkeypatch.setattr(engine, "generate", broken)
    with pytest.raises(BackendError, match="EngineCore died"):
        await collect(vllm_backend, request(vllm_backend, "dead"))
    assert engine.aborted == ["dead"]


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise TimeoutError("condition not met")


async def test_a_dead_engine_core_ends_every_stream_and_a_new_engine_serves(
    hf_manifest: ModelManifest,
) -> None:
    double = VllmDouble(token_delay_s=0.01)
    vllm_backend = VllmBackend(
        hf_manifest, parallel=3, api_loader=double.api, restart_backoff_s=0.01
    )
    await vllm_backend.start()
    first = double.engine
    assert first is not None

    async def run(rid: str) -> BaseException | None:
        try:
            await collect(vllm_backend, request(vllm_backend, rid, max_tokens=1000))
        except BaseException as exc:
            return exc
        return None

    streams = [asyncio.create_task(run(f"r{i}")) for i in range(3)]
    await eventually(lambda: len(first.running) == 3)
    first.die()
    ended = await asyncio.gather(*streams)
    assert all(isinstance(e, EngineRestarted) for e in ended), ended
    assert vllm_backend.unavailable is not None and "died" in vllm_backend.unavailable
    with pytest.raises(EngineUnavailable):
        await collect(vllm_backend, request(vllm_backend, "meanwhile"))
    await eventually(lambda: vllm_backend.unavailable is None)
    assert first.is_shut_down and double.engines_made == 2
    events = await collect(vllm_backend, request(vllm_backend, "after", max_tokens=3))
    assert [e.finish_reason for e in events][-1] == "length"
    assert vllm_backend.info.restarts == 1
    await vllm_backend.close()


async def test_generate_before_start_is_a_backend_error(hf_manifest: ModelManifest) -> None:
    vllm_backend = make_double_vllm_backend(hf_manifest)
    with pytest.raises(BackendError):
        await collect(vllm_backend, GenerationRequest("r", [1, 2], SamplingParams(max_tokens=1)))


async def test_a_missing_model_directory_fails_the_start(tmp_path: Path) -> None:
    manifest = ModelManifest(name="gone", hf=HfArtifact(path=tmp_path / "nope"), source=tmp_path)
    with pytest.raises(BackendError, match="not found"):
        await VllmBackend(manifest, api_loader=VllmDouble().api).start()


async def test_an_engine_that_cannot_start_fails_the_start(hf_manifest: ModelManifest) -> None:
    double = VllmDouble()
    api = double.api(VllmOptions())

    def no_gpu(options: VllmOptions) -> Any:
        def fail(kwargs: dict[str, Any]) -> Any:
            raise RuntimeError("CUDA out of memory")

        return type(api)(**{**api.__dict__, "make_engine": fail})

    with pytest.raises(BackendError, match="CUDA out of memory"):
        await VllmBackend(hf_manifest, api_loader=no_gpu).start()


# --- tokenizer, chat template, engine arguments ----------------------------------------------


async def test_chat_messages_go_through_the_tokenizers_chat_template(backend: Any) -> None:
    vllm_backend, _ = backend
    text = vllm_backend.render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = vllm_backend.tokenize(text, add_special=False, parse_special=True)
    assert ids[0] == ByteTokenizer.SPECIAL.index("<|im_start|>")


async def test_a_message_the_template_refuses_is_an_unsupported_chat_template(
    backend: Any,
) -> None:
    vllm_backend, _ = backend
    with pytest.raises(UnsupportedFeature) as caught:
        vllm_backend.render_chat([ChatMessage("narrator", "Once upon a time")])
    assert caught.value.feature == "chat_template"


async def test_a_model_without_chat_template_refuses_messages(backend: Any) -> None:
    vllm_backend, engine = backend
    engine.tokenizer.chat_template = None
    with pytest.raises(UnsupportedFeature, match="no chat template"):
        vllm_backend.render_chat([ChatMessage("user", "Hi")])


async def test_special_tokens_in_user_text_are_not_parsed(backend: Any) -> None:
    vllm_backend, _ = backend
    plain = vllm_backend.tokenize("<|im_end|>", add_special=True, parse_special=False)
    parsed = vllm_backend.tokenize("<|im_end|>", add_special=False, parse_special=True)
    assert plain[0] == ByteTokenizer.BOS and len(plain) == 1 + len("<|im_end|>")
    assert parsed == [ByteTokenizer.SPECIAL.index("<|im_end|>")]
    assert vllm_backend.detokenize(plain) == "<|im_end|>"


async def test_detokenize_refuses_ids_outside_the_vocabulary(backend: Any) -> None:
    vllm_backend, _ = backend
    with pytest.raises(UnsupportedFeature) as caught:
        vllm_backend.detokenize([10**6])
    assert caught.value.feature == "prompt_tokens"


async def test_engine_arguments_come_from_manifest_settings_and_options(
    hf_manifest: ModelManifest,
) -> None:
    options = VllmOptions(
        gpu_memory_utilization=0.6,
        tensor_parallel_size=2,
        max_num_seqs=16,
        enforce_eager=True,
        engine_args={"quantization": "fp8"},
    )
    vllm_backend, engine = await started(hf_manifest, options)
    args = engine.engine_args
    assert args["model"] == str(hf_manifest.source.parent / "weights")
    assert args["served_model_name"] == "tiny-hf"
    assert args["max_model_len"] == 256
    assert (args["max_num_seqs"], args["gpu_memory_utilization"]) == (16, 0.6)
    assert (args["tensor_parallel_size"], args["enforce_eager"]) == (2, True)
    assert args["enable_prefix_caching"] is True
    assert args["quantization"] == "fp8"
    info = vllm_backend.info
    assert (info.name, info.context_length, info.parallel) == ("vllm", 256, 16)
    assert info.vocab_size == len(ByteTokenizer())


async def test_close_shuts_the_engine_down(backend: Any) -> None:
    vllm_backend, engine = backend
    await vllm_backend.close()
    assert engine.is_shut_down


async def test_the_backend_satisfies_the_protocol(hf_manifest: ModelManifest) -> None:
    assert isinstance(make_double_vllm_backend(hf_manifest), Backend)


async def test_the_double_backend_serves_the_default_manifest(manifest: ModelManifest) -> None:
    # What a wire-format suite parametrised over both backends would do.
    vllm_backend = make_double_vllm_backend(manifest)
    await vllm_backend.start()
    try:
        prompt = vllm_backend.tokenize("Hi", add_special=True, parse_special=False)
        events = await collect(vllm_backend, GenerationRequest("r", prompt, SamplingParams(3)))
        assert "".join(e.text for e in events) == "Hel"
        assert vllm_backend.info.context_length == manifest.context_length
    finally:
        await vllm_backend.close()
