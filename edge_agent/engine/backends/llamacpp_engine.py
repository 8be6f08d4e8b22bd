"""The llama.cpp engine proper: weights, context and decode loop, in whichever process runs it.

Everything here may crash with the C++ library underneath it, so the daemon runs it in
an engine process (``llamacpp_worker``) and only the tokenizer in its own. ``self_check``
is the proof a configuration decodes on this box: it runs before the engine says it is
ready, and the probes of ``llamacpp_probe`` run nothing else.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import structlog

from edge_agent.engine.backends.llamacpp_batch import DecodeLoop, StepSink
from edge_agent.engine.backends.llamacpp_config import CpuConfig
from edge_agent.engine.backends.llamacpp_embed import Embedder
from edge_agent.engine.backends.llamacpp_speculation import (
    SpeculationOptions,
    VerifyCosts,
    costs_from_timings,
    linear_costs,
)
from edge_agent.engine.backends.llamacpp_vocab import Vocabulary
from edge_agent.engine.types import BackendError

log = structlog.get_logger(__name__)

# A fixed prompt for the self-check: ordinary text, so a broken kernel shows as tokens
# that differ from another configuration's or between two sequences of one batch.
SELF_CHECK_PROMPT = "The capital of France is Paris. The capital of Italy is"


# ggml's type ids (ggml.h) for the KV cache element types the settings offer.
_GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}
_QUANTIZED = {"q4_0", "q8_0"}


def kv_cache_types(name: str) -> tuple[int, int]:
    """(keys, values) ggml types for a KV cache type name.

    Without flash attention llama.cpp refuses a quantized value cache, so a quantized
    type quantizes the keys and the values stay f16.
    """
    if name not in _GGML_TYPES:
        raise BackendError(f"unknown KV cache type {name!r}")
    key = _GGML_TYPES[name]
    return key, _GGML_TYPES["f16"] if name in _QUANTIZED else key


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """What the engine is loaded with (picklable: it crosses into the engine process)."""

    gguf_path: Path
    context_length: int
    parallel: int
    threads: int
    n_batch: int
    prefix_cache: bool
    config: CpuConfig
    kv_cache_type: str = "f16"
    # The embedding context (made on first use): tokens per batch, which is also the
    # most one input may have, and inputs per batch.
    embedding_max_tokens: int = 512
    embedding_sequences: int = 16
    # A separate embedding model, loaded beside the chat model; None embeds with it.
    embedding_gguf: Path | None = None
    speculation: SpeculationOptions = field(default_factory=SpeculationOptions)


@dataclass(frozen=True, slots=True)
class SelfCheck:
    """Greedy tokens two sequences decoded side by side in one batch, and how long it took."""

    tokens: tuple[int, ...]
    batch_agrees: bool  # both sequences of the batch chose the same tokens
    finite: bool  # every logit looked at was a number
    seconds: float

    @property
    def passed(self) -> bool:
        return self.batch_agrees and self.finite and bool(self.tokens)


class LlamaCppEngine:
    """Loads the model with one CPU configuration and runs the decode loop over it."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self._model: Any = None
        self._embedding_model: Any = None
        self._ctx: Any = None
        self.vocab: Vocabulary | None = None
        self.n_ctx_seq = options.context_length
        self.loop: DecodeLoop | None = None
        self.embedder: Embedder | None = None

    def load(self) -> None:
        options = self.options
        if not options.gguf_path.is_file():
            raise BackendError(f"model file not found: {options.gguf_path}")
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        options.config.apply(model_params)
        self._model = llama_cpp.llama_model_load_from_file(
            str(options.gguf_path).encode(), model_params
        )
        if not self._model:
            raise BackendError(f"llama.cpp could not load {options.gguf_path}")
        self.vocab = Vocabulary(self._model)
        embedding_model = self._model
        if options.embedding_gguf is not None:
            # Loaded the way the chat model is: the CPU configuration that decoded here.
            self._embedding_model = llama_cpp.llama_model_load_from_file(
                str(options.embedding_gguf).encode(), model_params
            )
            if not self._embedding_model:
                raise BackendError(f"llama.cpp could not load {options.embedding_gguf}")
            embedding_model = self._embedding_model
        self.embedder = Embedder(
            embedding_model,
            n_vocab=llama_cpp.llama_vocab_n_tokens(
                llama_cpp.llama_model_get_vocab(embedding_model)
            ),
            max_tokens=options.embedding_max_tokens,
            max_sequences=options.embedding_sequences,
            threads=options.threads,
        )
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = options.context_length * options.parallel
        ctx_params.n_seq_max = options.parallel
        ctx_params.n_batch = options.n_batch
        ctx_params.n_ubatch = options.n_batch
        ctx_params.n_threads = options.threads
        ctx_params.n_threads_batch = options.threads
        # One KV stream per sequence: a sequence's cells never move with its neighbours.
        ctx_params.kv_unified = False
        # Flash attention's CPU kernel tiles multi-token batches, so a prompt's KV would
        # depend on how it was split into batches and prefix reuse would change greedy text.
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx_params.type_k, ctx_params.type_v = kv_cache_types(options.kv_cache_type)
        ctx_params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            raise BackendError("llama.cpp could not create a context (out of memory?)")
        self.n_ctx_seq = min(self.n_ctx_seq, llama_cpp.llama_n_ctx_seq(self._ctx))
        if b"LLAMAFILE = 1" in llama_cpp.llama_print_system_info():
            log.warning(
                "llamacpp_build_not_batch_invariant",
                detail="llama.cpp was built with LLAMAFILE: temperature-0 text may differ "
                "between a request alone and one batched with others; rebuild with "
                "CMAKE_ARGS=-DGGML_LLAMAFILE=OFF (scripts/bootstrap does)",
            )

    def self_check(self, n_tokens: int = 4) -> SelfCheck:
        """Decode ``n_tokens`` greedy tokens of a fixed prompt, as the serving loop would.

        Two sequences share each batch when there are two slots: the batched path is the
        one that serves, and two copies of one prompt must agree token for token.
        """
        assert self._ctx is not None and self.vocab is not None
        started = time.perf_counter()
        prompt = self.vocab.tokenize(SELF_CHECK_PROMPT, add_special=True, parse_special=False)
        n_seq = min(2, self.options.parallel)
        batch = llama_cpp.llama_batch_init(max(len(prompt) * n_seq, n_seq), 0, 1)
        memory = llama_cpp.llama_get_memory(self._ctx)
        chosen: list[list[int]] = [[] for _ in range(n_seq)]
        finite = True
        try:
            feed: list[list[int]] = [list(prompt) for _ in range(n_seq)]
            position = 0
            for _ in range(n_tokens):
                n = 0
                last: list[int] = []
                for seq, tokens in enumerate(feed):
                    for offset, token in enumerate(tokens):
                        _put(batch, n, token, position + offset, seq, offset == len(tokens) - 1)
                        n += 1
                    last.append(n - 1)
                batch.n_tokens = n
                status = llama_cpp.llama_decode(self._ctx, batch)
                if status != 0:
                    raise BackendError(f"llama_decode returned {status} in the self-check")
                position += len(feed[0])
                for seq, index in enumerate(last):
                    token, ok = _greedy(self._ctx, index, self.vocab.n_vocab)
                    finite = finite and ok
                    chosen[seq].append(token)
                feed = [[chosen[seq][-1]] for seq in range(n_seq)]
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_memory_clear(memory, True)
        return SelfCheck(
            tokens=tuple(chosen[0]),
            batch_agrees=all(c == chosen[0] for c in chosen),
            finite=finite,
            seconds=time.perf_counter() - started,
        )

    def verify_costs(self) -> VerifyCosts:
        """What verifying drafted tokens costs here, per ``costs_from_timings``.

        Measured unless the settings give it: it is a property of the CPU, the build and
        the model (a small model on few cores computes every row; a large one reads the
        same weights for all rows of a batch, and extra rows come nearly free).
        """
        speculation = self.options.speculation
        if speculation.verify_cost is not None:
            return VerifyCosts(linear_costs(speculation.verify_cost, speculation.max_draft))
        sizes = sorted({1, 2, max(2, speculation.max_draft // 2 + 1), speculation.max_draft + 1})
        seconds = self._time_decodes(sizes)
        costs = costs_from_timings(seconds, speculation.max_draft)
        log.info(
            "speculation_costs",
            one_token_ms=round(seconds[1] * 1000, 2),
            costs={size: round(costs[size], 2) for size in sizes},
        )
        return VerifyCosts(costs, seconds[1])

    def _time_decodes(self, sizes: Sequence[int], rounds: int = 4) -> dict[int, float]:
        """The fastest of a few decodes of each size of tokens of one sequence, in seconds.

        The sizes take turns, round by round, so that other work on a shared box slows
        them alike; the fastest of each is the one least disturbed.
        """
        assert self._ctx is not None and self.vocab is not None
        memory = llama_cpp.llama_get_memory(self._ctx)
        batch = llama_cpp.llama_batch_init(max(sizes), 0, 1)
        best = dict.fromkeys(sizes, math.inf)
        try:
            for round_ in range(rounds + 1):
                for size in sizes:
                    for i in range(size):
                        _put(batch, i, (i * 7919 + 100) % self.vocab.n_vocab, i, 0, True)
                    batch.n_tokens = size
                    started = time.perf_counter()
                    status = llama_cpp.llama_decode(self._ctx, batch)
                    elapsed = time.perf_counter() - started
                    llama_cpp.llama_memory_seq_rm(memory, 0, 0, -1)
                    if status != 0:
                        raise BackendError(f"llama_decode returned {status} while timing")
                    if round_ > 0:  # the first warms the caches
                        best[size] = min(best[size], elapsed)
        finally:
            llama_cpp.llama_batch_free(batch)
        return best

    def start_loop(self, sink: StepSink) -> DecodeLoop:
        assert self._ctx is not None and self.vocab is not None
        options = self.options
        speculation = options.speculation
        self.loop = DecodeLoop(
            ctx=self._ctx,
            vocab=self.vocab,
            n_slots=options.parallel,
            n_ctx_seq=self.n_ctx_seq,
            n_batch=options.n_batch,
            prefix_cache=options.prefix_cache,
            sink=sink,
            speculation=speculation,
            verify_costs=self.verify_costs if speculation.enabled else None,
        )
        self.loop.start()
        return self.loop

    def start(self, sink: StepSink) -> SelfCheck:
        """Start the decode loop and self-check on its thread: the one thread that computes."""
        loop = self.start_loop(sink)
        return loop.call(self.self_check).result()

    def embed(
        self, inputs: Sequence[Sequence[int]]
    ) -> concurrent.futures.Future[list[tuple[float, ...]]]:
        """One vector per input, computed on the decode thread between steps."""
        embedder, loop = self.embedder, self.loop
        if embedder is None or loop is None:
            raise BackendError("the engine has no embedding context")
        return loop.call(lambda: embedder.embed(inputs))

    def close(self) -> None:
        if self.loop is not None:
            self.loop.stop()
            self.loop = None
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._embedding_model:
            llama_cpp.llama_model_free(self._embedding_model)
            self._embedding_model = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


def _put(batch: Any, i: int, token: int, position: int, seq: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = position
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


def _greedy(ctx: Any, index: int, n_vocab: int) -> tuple[int, bool]:
    pointer = llama_cpp.llama_get_logits_ith(ctx, index)
    logits = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (n_vocab,))
    best = int(np.argmax(logits))
    return best, math.isfinite(float(logits[best])) and bool(np.isfinite(logits).all())


def agree(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two configurations' self-check tokens are the same text."""
    return tuple(a) == tuple(b)
