"""The vLLM backend: a Hugging Face model on a CUDA GPU, vLLM's async engine in-process.

Written against vLLM 0.33's ``AsyncLLM`` (``vllm.engine.async_llm_engine.AsyncLLMEngine``
is its alias): ``from_engine_args``, ``generate(prompt, sampling_params, request_id)``
streaming ``RequestOutput`` objects, ``abort(request_id)``, ``get_tokenizer()``.
vLLM is imported only in ``start`` so that this module, and the daemon on a CPU box,
import without it. Every vLLM name we use is gathered in ``VllmApi``; tests swap in
an engine double there instead of a GPU.

Stop strings stay above the backend (the scheduler matches them for both backends),
so vLLM is never given any: the text it streams is the raw model output.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edge_agent.config import VllmOptions
from edge_agent.engine.types import (
    BackendError,
    BackendInfo,
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    EngineRestarted,
    EngineUnavailable,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    ToolCallFormat,
    ToolSpec,
    TopLogprob,
    UnsupportedFeature,
)
from edge_agent.manifest import ManifestError, ModelManifest
from edge_agent.observability import ENGINE_RESTARTS

log = structlog.get_logger(__name__)

# vLLM embeds only with a pooling model (its runner="pooling", AsyncLLM.encode); the
# engine this backend starts is a generation one, which vLLM refuses to pool.
_NO_EMBEDDINGS = "the vLLM backend serves a generation model; it has no embeddings"


@dataclass(frozen=True)
class VllmApi:
    """The vLLM names this backend uses, so a test can put an engine double behind them."""

    version: str
    sampling_params: Callable[..., Any]  # vllm.SamplingParams
    structured_outputs: Callable[..., Any] | None  # vllm.sampling_params.StructuredOutputsParams
    delta_output_kind: Any  # vllm.sampling_params.RequestOutputKind.DELTA
    # What SamplingParams and the engine raise for a request they refuse.
    validation_errors: tuple[type[BaseException], ...]
    # AsyncEngineArgs keyword arguments -> an AsyncLLM-shaped engine (blocking: loads weights).
    make_engine: Callable[[dict[str, Any]], Any]
    env: Mapping[str, str] = field(default_factory=dict)  # set before the engine starts
    # What the engine raises once its engine-core process has died (EngineDeadError).
    dead_errors: tuple[type[BaseException], ...] = ()


def load_vllm_api(options: VllmOptions) -> VllmApi:
    """Import vLLM (slow: torch, CUDA) and gather what the backend needs from it."""
    env = {
        # Our daemon has threads (log writer, executors); forking it for the engine
        # core process is unsafe, so start that process fresh.
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "VLLM_BATCH_INVARIANT": "1" if options.batch_invariant else "0",
    }
    _apply_env(env)  # before the import: some of vLLM reads its env at import time
    try:
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.engine.async_llm_engine import AsyncLLMEngine
        from vllm.sampling_params import RequestOutputKind
    except ImportError as exc:
        raise BackendError(f"vLLM is not importable: {exc}") from None
    structured: Callable[..., Any] | None = None
    try:
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams
    except ImportError:  # an older vLLM: json response formats are then refused
        pass
    errors: list[type[BaseException]] = [ValueError]
    try:
        from vllm.exceptions import VLLMValidationError

        errors.append(VLLMValidationError)
    except ImportError:
        pass

    dead: list[type[BaseException]] = []
    try:
        from vllm.v1.engine.exceptions import EngineDeadError

        dead.append(EngineDeadError)
    except ImportError:
        pass
    try:
        from vllm.engine.async_llm_engine import AsyncEngineDeadError

        dead.append(AsyncEngineDeadError)
    except ImportError:
        pass

    def make_engine(kwargs: dict[str, Any]) -> Any:
        return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))

    return VllmApi(
        version=str(vllm.__version__),
        sampling_params=vllm.SamplingParams,
        structured_outputs=structured,
        delta_output_kind=RequestOutputKind.DELTA,
        validation_errors=tuple(errors),
        make_engine=make_engine,
        env=env,
        dead_errors=tuple(dead),
    )


def _apply_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        os.environ.setdefault(key, value)  # an operator's own setting wins


def hf_model_path(manifest: ModelManifest) -> Path:
    """The manifest's Hugging Face directory, relative paths taken from the manifest's."""
    if manifest.hf is None:
        raise ManifestError(f"model {manifest.name!r} has no [hf] artifact for vLLM")
    path = manifest.hf.path
    return path if path.is_absolute() else manifest.source.parent / path


# vLLM's SamplingParams fields that differ in name from ours.
_FEATURE_NAMES = {"structured_outputs": "structured_output"}
_KNOWN_PARAMS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "structured_outputs",
)


class VllmBackend:
    """Serves a Hugging Face-format model with vLLM's continuous batching on the GPU."""

    def __init__(
        self,
        manifest: ModelManifest,
        options: VllmOptions | None = None,
        *,
        context_length: int | None = None,
        parallel: int = 4,
        prefix_cache: bool = True,
        api_loader: Callable[[VllmOptions], VllmApi] = load_vllm_api,
        restart_backoff_s: float = 0.5,
    ) -> None:
        self._manifest = manifest
        self._options = options or VllmOptions()
        self._context_length = (
            self._options.max_model_len or context_length or manifest.context_length
        )
        self._parallel = self._options.max_num_seqs or parallel
        self._prefix_cache = prefix_cache
        self._api_loader = api_loader
        self._api: VllmApi | None = None
        self._engine: Any = None
        self._tokenizer: Any = None
        self._vocab_size = 0
        self._restart_backoff_s = restart_backoff_s
        self._unavailable: str | None = None
        self._restarting: asyncio.Task[None] | None = None
        self.restarts = 0
        self.last_restart_s: float | None = None

    @property
    def info(self) -> BackendInfo:
        options = self._options
        version = self._api.version if self._api else "not loaded"
        return BackendInfo(
            name="vllm",
            context_length=self._context_length,
            parallel=self._parallel,
            vocab_size=self._vocab_size,
            detail=(
                f"vLLM {version}, gpu_memory_utilization {options.gpu_memory_utilization}, "
                f"tensor_parallel_size {options.tensor_parallel_size}"
            ),
            restarts=self.restarts,
        )

    @property
    def unavailable(self) -> str | None:
        return self._unavailable

    def engine_args(self) -> dict[str, Any]:
        """The AsyncEngineArgs this backend starts vLLM with."""
        options = self._options
        path = str(hf_model_path(self._manifest))
        return {
            "model": path,
            "served_model_name": self._manifest.name,
            "max_model_len": self._context_length,
            "max_num_seqs": self._parallel,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "tensor_parallel_size": options.tensor_parallel_size,
            "dtype": options.dtype,
            "enforce_eager": options.enforce_eager,
            "enable_prefix_caching": self._prefix_cache,
            "max_logprobs": options.max_logprobs,
            "trust_remote_code": options.trust_remote_code,
            # Our own /metrics and structlog events cover requests; vLLM's periodic
            # stats lines would only add noise to the journal.
            "disable_log_stats": True,
            **options.engine_args,
        }

    async def start(self) -> None:
        path = hf_model_path(self._manifest)
        if not path.is_dir():
            raise BackendError(f"Hugging Face model directory not found: {path}")
        # Importing vLLM pulls in torch and CUDA: seconds of blocking work.
        api = await asyncio.to_thread(self._api_loader, self._options)
        kwargs = self.engine_args()
        log.info("vllm_engine_starting", vllm=api.version, **_loggable(kwargs))
        # Building the engine loads the weights and captures CUDA graphs (minutes).
        # AsyncLLM supports being built outside the event loop: its output tasks
        # start on the first request, on the loop that makes it.
        try:
            engine = await asyncio.to_thread(api.make_engine, kwargs)
        except Exception as exc:
            raise BackendError(f"vLLM could not start: {exc}") from exc
        tokenizer = engine.get_tokenizer()
        if inspect.isawaitable(tokenizer):  # a coroutine in older vLLM releases
            tokenizer = await tokenizer
        self._api, self._engine, self._tokenizer = api, engine, tokenizer
        self._vocab_size = len(tokenizer)
        # vLLM may fit the window to the memory it found; report what it really serves.
        actual = getattr(getattr(engine, "model_config", None), "max_model_len", None)
        if isinstance(actual, int) and 0 < actual < self._context_length:
            self._context_length = actual
        log.info(
            "model_loaded",
            path=str(path),
            vocab_size=self._vocab_size,
            context_per_sequence=self._context_length,
            parallel=self._parallel,
            chat_template=getattr(tokenizer, "chat_template", None) is not None,
        )

    async def close(self) -> None:
        if self._restarting is not None:
            self._restarting.cancel()
        engine, self._engine = self._engine, None
        if engine is not None and hasattr(engine, "shutdown"):
            # Stopping the engine-core process joins it: seconds the event loop must not wait.
            await asyncio.to_thread(engine.shutdown)

    # --- text <-> tokens -----------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        tokenizer = self._require_tokenizer()
        if not parse_special:
            # Hugging Face tokenizers read special tokens spelled in text unless told
            # not to; user text must not be able to forge them.
            try:
                return list(
                    tokenizer.encode(
                        text, add_special_tokens=add_special, split_special_tokens=True
                    )
                )
            except TypeError:
                pass  # a tokenizer without the switch: special tokens are parsed
        return list(tokenizer.encode(text, add_special_tokens=add_special))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        tokenizer = self._require_tokenizer()
        if any(not 0 <= t < self._vocab_size for t in token_ids):
            raise UnsupportedFeature("prompt_tokens", "token id outside the vocabulary")
        # Special tokens render as nothing, as llama.cpp's pieces do.
        return str(tokenizer.decode(list(token_ids), skip_special_tokens=True))

    @property
    def tool_call_format(self) -> ToolCallFormat | None:
        # Tool calls need the output grammar and parsers of the llama.cpp backend; vLLM's
        # own tool parsers are chosen per model by flags this adapter does not set.
        return None

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        add_generation_prompt: bool = True,
    ) -> str:
        if tools or any(m.tool_calls or m.tool_call_id for m in messages):
            raise UnsupportedFeature("tools", "tool calling is not supported on this backend")
        tokenizer = self._require_tokenizer()
        if getattr(tokenizer, "chat_template", None) is None:
            raise UnsupportedFeature("chat_template", "this model has no chat template")
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as exc:  # templates raise on roles or orders they refuse
            raise UnsupportedFeature("chat_template", f"the template refuses them: {exc}") from None
        return str(rendered)

    def _require_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise BackendError("model is not loaded")
        return self._tokenizer

    # --- generation ----------------------------------------------------------------------

    def check_supported(self, params: SamplingParams) -> None:
        if params.logprobs is not None and params.logprobs > self._options.max_logprobs:
            raise UnsupportedFeature(
                "logprobs",
                f"at most {self._options.max_logprobs} on this model",
            )
        for token in params.logit_bias:
            if not 0 <= token < self._vocab_size:
                raise UnsupportedFeature("logit_bias", f"token id {token} is not in the vocabulary")
        constraint = params.structured_output
        if constraint is not None and constraint.kind == "json_schema":
            if constraint.schema_json is not None:
                try:
                    json.loads(constraint.schema_json)
                except ValueError as exc:
                    raise UnsupportedFeature(
                        "structured_output", f"the JSON schema is not JSON: {exc}"
                    ) from None
        if self._api is not None:
            self.sampling_params(params)  # vLLM's own range checks

    def sampling_params(self, params: SamplingParams) -> Any:
        """vLLM's SamplingParams for ours; UnsupportedFeature for what vLLM refuses."""
        api = self._require_api()
        kwargs: dict[str, Any] = {
            "n": 1,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            # -1 disables top-k in every vLLM release (0 only in recent ones).
            "top_k": params.top_k if params.top_k > 0 else -1,
            "min_p": params.min_p,
            "seed": params.seed,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "repetition_penalty": params.repetition_penalty,
            "logit_bias": dict(params.logit_bias) or None,
            "logprobs": params.logprobs,
            # Deltas: each output holds only what is new, so nothing is re-sent or re-diffed.
            "output_kind": api.delta_output_kind,
            "skip_special_tokens": True,
        }
        constraint = params.structured_output
        if constraint is not None:
            if api.structured_outputs is None:
                raise UnsupportedFeature(
                    "structured_output",
                    f"vLLM {api.version} has no structured outputs",
                )
            if constraint.kind == "json_schema" and constraint.schema_json is not None:
                kwargs["structured_outputs"] = api.structured_outputs(json=constraint.schema_json)
            else:
                kwargs["structured_outputs"] = api.structured_outputs(json_object=True)
        try:
            return api.sampling_params(**kwargs)
        except api.validation_errors as exc:
            raise UnsupportedFeature(_feature_of(exc), str(exc)) from None

    def _require_api(self) -> VllmApi:
        if self._api is None:
            raise BackendError("model is not loaded")
        return self._api

    def _is_dead(self, engine: Any, exc: BaseException) -> bool:
        api = self._api
        dead = api.dead_errors if api is not None else ()
        return bool(dead and isinstance(exc, dead)) or bool(getattr(engine, "errored", False))

    def _engine_died(self, engine: Any, exc: BaseException) -> None:
        """The first request to see the engine core dead starts the one restart."""
        if engine is not self._engine:
            return
        self._engine = None
        self._unavailable = f"vLLM's engine core died ({exc}) and is restarting"
        ENGINE_RESTARTS.labels(reason="engine_dead").inc()
        log.error("engine_died", backend="vllm", why=str(exc))
        self._restarting = asyncio.get_running_loop().create_task(self._restart(engine))

    async def _restart(self, dead: Any) -> None:
        died_at = time.perf_counter()
        if hasattr(dead, "shutdown"):
            try:
                await asyncio.to_thread(dead.shutdown)
            except Exception as exc:  # it is dead already; what is left is its resources
                log.warning("vllm_shutdown_failed", error=str(exc))
        delay = self._restart_backoff_s
        while True:
            await asyncio.sleep(delay)
            api = self._require_api()
            try:
                engine = await asyncio.to_thread(api.make_engine, self.engine_args())
                break
            except Exception as exc:
                self._unavailable = f"vLLM's engine core cannot start again: {exc}"
                log.error("engine_restart_failed", backend="vllm", error=str(exc))
                delay = min(30.0, delay * 2)
        self._engine = engine
        self._unavailable = None
        self.restarts += 1
        self.last_restart_s = time.perf_counter() - died_at
        log.info("engine_restarted", backend="vllm", seconds=round(self.last_restart_s, 3))

    def tokenize_for_embedding(self, text: str) -> list[int]:
        raise UnsupportedFeature("embeddings", _NO_EMBEDDINGS)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        raise UnsupportedFeature("embeddings", _NO_EMBEDDINGS)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        engine = self._engine
        if engine is None:
            if self._unavailable is not None:
                raise EngineUnavailable(self._unavailable)
            raise BackendError("model is not loaded")
        api = self._require_api()
        params = self.sampling_params(request.params)
        # Token ids, not text: the server already tokenized (and counted) the prompt.
        prompt = {"prompt_token_ids": list(request.prompt_tokens)}
        stream = engine.generate(prompt, params, request.request_id)
        splitter = _EventSplitter(top_n=request.params.logprobs)
        finished = False
        started = False
        try:
            try:
                async for output in stream:
                    for event in splitter.events(output.outputs[0]):
                        started = True
                        finished = event.finish_reason is not None
                        yield event
                    if finished:
                        break
            except (BackendError, UnsupportedFeature):
                raise
            except api.validation_errors as exc:
                if started:
                    raise BackendError(f"vLLM failed mid-sequence: {exc}") from exc
                # Refused on admission (a schema the grammar backend can't compile, ...).
                raise UnsupportedFeature(_feature_of(exc), str(exc)) from None
            except Exception as exc:
                if self._is_dead(engine, exc):
                    self._engine_died(engine, exc)
                    raise EngineRestarted(
                        f"vLLM's engine core died ({exc}); retry shortly"
                    ) from exc
                raise BackendError(f"vLLM failed: {exc}") from exc
            if not finished:
                raise BackendError("vLLM ended the sequence without a finish reason")
        finally:
            if not finished:
                # Cancellation (aclose) or failure: free the sequence's KV blocks now.
                try:
                    await engine.abort(request.request_id)
                except Exception as exc:
                    log.warning("vllm_abort_failed", request_id=request.request_id, error=str(exc))
            await stream.aclose()


class _EventSplitter:
    """Turns vLLM's per-output deltas into one TokenEvent per generated token."""

    def __init__(self, *, top_n: int | None) -> None:
        self._top_n = top_n
        self._held = ""  # text that came with no token yet; it rides on the next one

    def events(self, completion: Any) -> Iterator[TokenEvent]:
        token_ids = [int(t) for t in completion.token_ids]
        text = self._held + (completion.text or "")
        self._held = ""
        reason = completion.finish_reason
        if reason not in (None, "stop", "length"):
            raise BackendError(f"vLLM ended the sequence: {reason}")
        # An end-of-sequence (or generation-config stop token) is the delta's last id;
        # vLLM leaves its text out. stop_reason is a string only for stop strings,
        # which we never pass.
        ends_on_stop_token = (
            reason == "stop" and bool(token_ids) and not isinstance(completion.stop_reason, str)
        )
        generated = token_ids[:-1] if ends_on_stop_token else token_ids
        logprobs = list(completion.logprobs) if completion.logprobs else []
        texts = _split_text(text, generated, logprobs)
        if texts is None:
            self._held = text  # no token to carry it yet
            if reason is not None:
                yield TokenEvent(token_id=None, text=self._take_held(), finish_reason="stop")
            return
        for index, (token, piece) in enumerate(zip(generated, texts, strict=True)):
            finish: FinishReason | None = None
            if index == len(generated) - 1 and reason is not None and not ends_on_stop_token:
                finish = "length" if reason == "length" else "stop"
            chosen, top = _logprobs_at(logprobs, index, token, self._top_n)
            yield TokenEvent(token, piece, finish, chosen, top)
        if ends_on_stop_token:
            yield TokenEvent(token_id=None, text="", finish_reason="stop")

    def _take_held(self) -> str:
        held, self._held = self._held, ""
        return held


def _split_text(text: str, tokens: Sequence[int], logprobs: Sequence[Any]) -> list[str] | None:
    """Each token's share of the delta text; None when there is no token to carry it.

    vLLM merges deltas when we read slower than it decodes, and then hands several
    tokens with one joined text. Their own texts are known only through logprobs'
    decoded tokens, and used only when they add up to exactly that text; otherwise the
    earlier tokens carry no text and the last carries it all (the protocol allows a
    token with empty text, as for an incomplete UTF-8 character).
    """
    if not tokens:
        return None
    if len(tokens) == 1:
        return [text]
    if len(logprobs) >= len(tokens):
        pieces: list[str] = []
        for position, token in zip(logprobs, tokens, strict=False):
            entry = position.get(token) if position else None
            piece = getattr(entry, "decoded_token", None)
            if not isinstance(piece, str):
                break
            pieces.append(piece)
        if len(pieces) == len(tokens) and "".join(pieces) == text:
            return pieces
    return [""] * (len(tokens) - 1) + [text]


def _logprobs_at(
    logprobs: Sequence[Any], index: int, token: int, top_n: int | None
) -> tuple[float | None, tuple[TopLogprob, ...]]:
    """The chosen token's logprob and the top_n alternatives at one position."""
    if top_n is None or index >= len(logprobs) or not logprobs[index]:
        return None, ()
    position: Mapping[int, Any] = logprobs[index]
    entry = position.get(token)
    chosen = float(entry.logprob) if entry is not None else None
    ranked = sorted(
        (e for e in position.values() if e.rank is not None and e.rank <= top_n),
        key=lambda e: e.rank,
    )
    top = tuple(TopLogprob(e.decoded_token or "", float(e.logprob)) for e in ranked[:top_n])
    return chosen, top


def _feature_of(exc: BaseException) -> str:
    """Which of our SamplingParams fields a vLLM validation error is about."""
    name = getattr(exc, "parameter", None)
    if not isinstance(name, str) or not name:
        message = str(exc)
        name = next((p for p in _KNOWN_PARAMS if message.startswith(p)), "")
        if not name and any(w in message.lower() for w in ("json", "schema", "grammar")):
            name = "structured_outputs"
    return _FEATURE_NAMES.get(name, name or "sampling")


def _loggable(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if isinstance(v, str | int | float | bool)}
