"""The llama.cpp backend (llama-cpp-python's low-level API): GGUF in, token events out.

``LlamaCppBackend`` runs the engine in this process; ``llamacpp_process`` runs the same
engine in a supervised child, which is what the daemon serves with. Both share
``LlamaCppFront``: the weights' digest check, the choice of CPU configuration, the
tokenizer in this process, and the routing of step outputs to each request's stream.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import structlog

from edge_agent.engine.backends.llamacpp_batch import SequenceState, StepOutput
from edge_agent.engine.backends.llamacpp_config import CONFIGS, CpuConfig, CpuRepack, ladder
from edge_agent.engine.backends.llamacpp_embed import embedding_length
from edge_agent.engine.backends.llamacpp_engine import EngineOptions, LlamaCppEngine
from edge_agent.engine.backends.llamacpp_probe import Verdict, VerdictCache, select_config
from edge_agent.engine.backends.llamacpp_sampling import SamplerChain, grammar_for
from edge_agent.engine.backends.llamacpp_speculation import SpeculationOptions
from edge_agent.engine.backends.llamacpp_vocab import Vocabulary, load_vocab_only, quiet_llama_logs
from edge_agent.engine.types import (
    BackendError,
    BackendInfo,
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    ToolCallFormat,
    ToolSpec,
)
from edge_agent.manifest import sha256_of

log = structlog.get_logger(__name__)

# What a request's stream receives: a step's events for it, or the error that ended it.
Delivery = list[TokenEvent] | BaseException


class LlamaCppFront:
    """What both llama.cpp backends do in the daemon's own process."""

    def __init__(
        self,
        gguf_path: Path,
        *,
        context_length: int,
        parallel: int = 4,
        threads: int | None = None,
        prefix_cache: bool = True,
        kv_cache_type: str = "f16",
        n_batch: int = 512,
        expected_sha256: str | None = None,
        cpu_repack: CpuRepack = "auto",
        probe_cache: Path | None = None,
        embedding_max_tokens: int = 512,
        embedding_sequences: int = 16,
        embedding_gguf: Path | None = None,
        embedding_sha256: str | None = None,
        speculation: SpeculationOptions | None = None,
    ) -> None:
        """``expected_sha256``: refuse to load a file whose digest differs (the manifest's).

        ``embedding_max_tokens``: tokens per embedding batch, and so the most one input may
        have; ``embedding_sequences``: inputs per embedding batch; ``embedding_gguf``: a
        separate embedding model (with its manifest digest), None to embed with this one.
        ``speculation``: drafting and verifying several tokens per step (None: off).
        """
        self._path = gguf_path
        self._expected_sha256 = expected_sha256
        self._n_ctx_seq = context_length
        self._parallel = parallel
        self._threads = threads or os.cpu_count() or 1
        self._prefix_cache = prefix_cache
        self._kv_cache_type = kv_cache_type
        self._n_batch = max(n_batch, parallel + 64)
        self._ladder = ladder(cpu_repack)
        self._cache = VerdictCache(probe_cache)
        self._vocab_model: Any = None
        self._vocab: Vocabulary | None = None
        self._digest = ""
        self.verdict: Verdict | None = None
        self._keys = itertools.count(1)
        self._inboxes: dict[int, asyncio.Queue[Delivery]] = {}
        self._embedding_max_tokens = embedding_max_tokens
        self._embedding_sequences = embedding_sequences
        self._embedding_length = 0
        self._embedding_path = embedding_gguf
        self._embedding_sha256 = embedding_sha256
        self._speculation = speculation or SpeculationOptions()
        self._embedding_vocab_model: Any = None
        self._embedding_vocab: Vocabulary | None = None
        # Embedding requests awaiting their vectors, by key (the process backend's).
        self._embeddings: dict[int, asyncio.Future[tuple[tuple[float, ...], ...]]] = {}
        # Load (probes, engine) at the lowest CPU priority: beside a serving engine.
        self.background = False

    restarts = 0

    @property
    def info(self) -> BackendInfo:
        verdict = self.verdict
        return BackendInfo(
            name="llamacpp",
            context_length=self._n_ctx_seq,
            parallel=self._parallel,
            vocab_size=self._vocab.n_vocab if self._vocab else 0,
            detail=f"llama-cpp-python {llama_cpp.__version__}, {self._threads} threads",
            configuration=verdict.config if verdict else None,
            configuration_reason=verdict.reason if verdict else None,
            restarts=self.restarts,
            engine_pid=self.engine_pid,
            cpu_features=cpu_features(),
            embedding_length=self._embedding_length,
            embedding_max_tokens=self._embedding_max_tokens,
        )

    @property
    def engine_pid(self) -> int | None:
        return None

    @property
    def unavailable(self) -> str | None:
        return None

    def _engine_options(self, config: CpuConfig) -> EngineOptions:
        return EngineOptions(
            gguf_path=self._path,
            context_length=self._n_ctx_seq,
            parallel=self._parallel,
            threads=self._threads,
            n_batch=self._n_batch,
            prefix_cache=self._prefix_cache,
            config=config,
            kv_cache_type=self._kv_cache_type,
            embedding_max_tokens=self._embedding_max_tokens,
            embedding_sequences=self._embedding_sequences,
            embedding_gguf=self._embedding_path,
            speculation=self._speculation,
        )

    async def _prepare(self) -> CpuConfig:
        """Check the weights, load the tokenizer here, and choose the CPU configuration."""
        await asyncio.to_thread(self._load_front)
        verdict = await asyncio.to_thread(
            select_config,
            self._ladder,
            gguf=self._path,
            gguf_sha256=self._digest,
            threads=self._threads,
            cache=self._cache,
            background=self.background,
        )
        self.verdict = verdict
        if verdict.config is None:
            raise BackendError(verdict.reason)
        log.info(
            "engine_configuration",
            config=verdict.config,
            reason=verdict.reason,
            cached=verdict.cached,
        )
        return CONFIGS[verdict.config]

    def _load_front(self) -> None:
        if not self._path.is_file():
            raise BackendError(f"model file not found: {self._path}")
        if self._expected_sha256 is None:
            stat = self._path.stat()
            self._digest = f"{stat.st_size}:{stat.st_mtime_ns}"  # names the file for the cache
        else:
            # /models reports the manifest's digest: serve only the weights it names.
            self._digest = sha256_of(self._path)
        if self._expected_sha256 is not None and self._digest != self._expected_sha256:
            raise BackendError(
                f"{self._path} has sha256 {self._digest}, the manifest says "
                f"{self._expected_sha256} (a partial copy or other weights)"
            )
        quiet_llama_logs()
        self._vocab_model = load_vocab_only(self._path)
        self._vocab = Vocabulary(self._vocab_model)
        self._embedding_length = embedding_length(self._vocab_model)
        if self._embedding_path is not None:
            self._load_embedding_vocab(self._embedding_path)

    def _load_embedding_vocab(self, path: Path) -> None:
        """The separate embedding model's tokenizer, after the same digest check."""
        if not path.is_file():
            raise BackendError(f"embedding model file not found: {path}")
        if self._embedding_sha256 is not None:
            digest = sha256_of(path)
            if digest != self._embedding_sha256:
                raise BackendError(
                    f"{path} has sha256 {digest}, the manifest says {self._embedding_sha256}"
                )
        self._embedding_vocab_model = load_vocab_only(path)
        self._embedding_vocab = Vocabulary(self._embedding_vocab_model)
        self._embedding_length = embedding_length(self._embedding_vocab_model)

    def _free_front(self) -> None:
        if self._embedding_vocab_model:
            llama_cpp.llama_model_free(self._embedding_vocab_model)
            self._embedding_vocab_model = None
        if self._vocab_model:
            llama_cpp.llama_model_free(self._vocab_model)
            self._vocab_model = None

    def _require_vocab(self) -> Vocabulary:
        if self._vocab is None:
            raise BackendError("model is not loaded")
        return self._vocab

    # --- text <-> tokens, in this process ------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return self._require_vocab().tokenize(
            text, add_special=add_special, parse_special=parse_special
        )

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self._require_vocab().detokenize(token_ids)

    @property
    def tool_call_format(self) -> ToolCallFormat | None:
        return self._vocab.tool_call_format if self._vocab else None

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        add_generation_prompt: bool = True,
    ) -> str:
        return self._require_vocab().render_chat(
            messages, tools=tools, add_generation_prompt=add_generation_prompt
        )

    def tokenize_for_embedding(self, text: str) -> list[int]:
        vocab = self._embedding_vocab or self._require_vocab()
        return vocab.tokenize(text, add_special=True, parse_special=False)

    def check_supported(self, params: SamplingParams) -> None:
        self._require_vocab().check_supported(params)

    # --- each request's stream of events -------------------------------------------------

    def _deliver(self, key: int, item: Delivery) -> None:
        inbox = self._inboxes.get(key)
        if inbox is not None:
            inbox.put_nowait(item)

    def _fail_all(self, error: BaseException) -> int:
        """End every request in flight with ``error``; how many there were."""
        inboxes, self._inboxes = self._inboxes, {}
        for inbox in inboxes.values():
            inbox.put_nowait(error)
        embeddings, self._embeddings = self._embeddings, {}
        for future in embeddings.values():
            if not future.done():
                future.set_exception(error)
        return len(inboxes) + len(embeddings)

    def _submit(self, key: int, request: GenerationRequest) -> None:
        raise NotImplementedError

    def _cancel(self, key: int) -> None:
        raise NotImplementedError

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        key = next(self._keys)
        inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self._inboxes[key] = inbox
        finished = False
        try:
            self._submit(key, request)
            while not finished:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                for event in item:
                    finished = event.finish_reason is not None
                    yield event
        finally:
            self._inboxes.pop(key, None)
            if not finished:
                self._cancel(key)


class LlamaCppBackend(LlamaCppFront):
    """The engine in this process: no isolation (a crash in llama.cpp ends the daemon).

    For benchmarks of the process boundary and for debugging; the daemon serves with
    ``LlamaCppProcessBackend`` unless ``engine.isolated`` is off.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._engine: LlamaCppEngine | None = None
        self._sequences: dict[int, SequenceState] = {}

    @property
    def decode_steps(self) -> int:
        engine = self._engine
        return engine.loop.steps if engine and engine.loop else 0

    async def start(self) -> None:
        config = await self._prepare()
        engine = LlamaCppEngine(self._engine_options(config))
        loop = asyncio.get_running_loop()

        def sink(outputs: StepOutput) -> None:
            loop.call_soon_threadsafe(self._dispatch, outputs)

        # Loading computes nothing; the self-check and all decoding run on the decode
        # thread, the only one that may compute (see llamacpp_batch).
        await asyncio.to_thread(engine.load)
        check = await asyncio.to_thread(engine.start, sink)
        if not check.passed:
            await asyncio.to_thread(engine.close)
            raise BackendError(f"the engine's self-check failed: {check}")
        self._n_ctx_seq = engine.n_ctx_seq
        self._engine = engine
        log.info(
            "model_loaded",
            path=str(self._path),
            context_per_sequence=self._n_ctx_seq,
            parallel=self._parallel,
            threads=self._threads,
            config=config.name,
            engine="in-process",
        )

    def _dispatch(self, outputs: StepOutput) -> None:
        for sequence, item in outputs:
            finished = isinstance(item, BaseException) or (
                bool(item) and item[-1].finish_reason is not None
            )
            if finished:
                self._sequences.pop(sequence.key, None)
            self._deliver(sequence.key, item)

    def _submit(self, key: int, request: GenerationRequest) -> None:
        engine = self._engine
        if engine is None or engine.loop is None or engine.vocab is None:
            raise BackendError("model is not loaded")
        vocab = engine.vocab
        sampler = SamplerChain(
            vocab.handle, vocab.n_vocab, request.params, grammar_for(request.params)
        )
        sequence = SequenceState(request=request, sampler=sampler, key=key)
        self._sequences[key] = sequence
        engine.loop.submit(sequence)

    def _cancel(self, key: int) -> None:
        sequence = self._sequences.pop(key, None)
        if sequence is not None:
            sequence.cancelled = True

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        engine = self._engine
        if engine is None or engine.embedder is None:
            raise BackendError("model is not loaded")
        vectors = await asyncio.wrap_future(engine.embed(request.inputs))
        return EmbeddingResult(tuple(vectors))

    async def close(self) -> None:
        # Joining the decode thread and freeing the KV cache take a while: off the loop.
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._free_front()


@functools.cache
def cpu_features() -> tuple[str, ...]:
    """The CPU features this llama.cpp build uses here, as its system info lists them on."""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    features = []
    for part in info.replace("|", "\n").splitlines():
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and value.strip() == "1":
            features.append(name)
    return tuple(dict.fromkeys(features))
