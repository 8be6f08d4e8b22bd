"""Embeddings on llama.cpp: a second context over the loaded model, in embedding mode.

The generation context keeps its slots and KV streams; embeddings get a context of their
own (``embeddings = true``, pooling from the GGUF, mean where the GGUF names none), made
on the first embedding request so a box that never embeds pays nothing for it. Several
inputs share one ``llama_decode``: each its own sequence id, the batch bounded by
``max_tokens`` (also one input's limit: pooling needs a whole input in one micro-batch)
and by ``max_sequences``. The KV cells are cleared after every batch, so no input sees
another's.

One thread at a time may embed (``embed`` holds a lock); the generation context's
decode thread runs on beside it, so a long embedding request never holds a generation
slot.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import llama_cpp
import numpy as np
import structlog

from edge_agent.engine.errors import BackendError, UnsupportedFeature

log = structlog.get_logger(__name__)

_POOLING_NAMES = {
    llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
    llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
    llama_cpp.LLAMA_POOLING_TYPE_LAST: "last",
}


def gguf_pooling(model: Any) -> int:
    """The pooling the GGUF asks for (``<arch>.pooling_type``), mean where it names none.

    A causal LM's GGUF names none (or "none": one vector per token), and its mean over the
    input is what llama-server and Ollama give for such a model.
    """
    arch = _meta(model, "general.architecture")
    value = _meta(model, f"{arch}.pooling_type") if arch else None
    if value is None or not value.lstrip("-").isdigit():
        return int(llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    pooling = int(value)
    if pooling in (llama_cpp.LLAMA_POOLING_TYPE_NONE, llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED):
        return int(llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    return pooling


def embedding_length(model: Any) -> int:
    """The model's vector length, from a loaded model or a vocabulary-only one.

    A model loaded with ``vocab_only`` (the daemon's tokenizer) reports 0 for
    ``llama_model_n_embd``; its GGUF metadata still says ``<arch>.embedding_length``.
    """
    n_embd = int(llama_cpp.llama_model_n_embd(model))
    if n_embd > 0:
        return n_embd
    arch = _meta(model, "general.architecture")
    value = _meta(model, f"{arch}.embedding_length") if arch else None
    return int(value) if value and value.isdigit() else 0


def _meta(model: Any, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(256)
    length = llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    if length < 0:
        return None
    return buffer.value.decode("utf-8", errors="replace")


def batches(
    inputs: Sequence[Sequence[int]], *, max_tokens: int, max_sequences: int
) -> Iterator[list[int]]:
    """Indices of the inputs, packed in order into batches of bounded tokens and sequences."""
    batch: list[int] = []
    tokens = 0
    for index, item in enumerate(inputs):
        if batch and (tokens + len(item) > max_tokens or len(batch) == max_sequences):
            yield batch
            batch, tokens = [], 0
        batch.append(index)
        tokens += len(item)
    if batch:
        yield batch


class Embedder:
    """The embedding context over a loaded model; thread-safe ``embed``."""

    def __init__(
        self, model: Any, *, n_vocab: int, max_tokens: int, max_sequences: int, threads: int
    ) -> None:
        self._model = model
        self._n_vocab = n_vocab
        self.n_embd: int = llama_cpp.llama_model_n_embd(model)
        self.max_tokens = max_tokens
        self._max_sequences = max_sequences
        self._threads = threads
        self._pooling = gguf_pooling(model)
        self._ctx: Any = None
        self._batch: Any = None
        self._lock = threading.Lock()
        self.batches = 0  # llama_decode calls made, for tests and benchmarks

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[tuple[float, ...]]:
        """One L2-normalised vector per input, in order."""
        for item in inputs:
            if not item or len(item) > self.max_tokens:
                raise UnsupportedFeature(
                    "embedding_input",
                    f"an input has {len(item)} tokens; each must have 1 to {self.max_tokens}",
                )
            if any(token < 0 or token >= self._n_vocab for token in item):
                raise UnsupportedFeature("embedding_input", "token id outside the vocabulary")
        out: list[tuple[float, ...]] = [() for _ in inputs]
        with self._lock:
            ctx = self._context()
            for group in batches(
                inputs, max_tokens=self.max_tokens, max_sequences=self._max_sequences
            ):
                vectors = self._decode(ctx, [inputs[i] for i in group])
                for index, vector in zip(group, vectors, strict=True):
                    out[index] = vector
        return out

    def _decode(self, ctx: Any, group: Sequence[Sequence[int]]) -> list[tuple[float, ...]]:
        batch = self._batch
        n = 0
        for seq, tokens in enumerate(group):
            for position, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = position
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True
                n += 1
        batch.n_tokens = n
        memory = llama_cpp.llama_get_memory(ctx)
        try:
            status = llama_cpp.llama_decode(ctx, batch)
            if status != 0:
                raise BackendError(f"llama_decode returned {status} while embedding")
            self.batches += 1
            vectors = []
            for seq in range(len(group)):
                pointer = llama_cpp.llama_get_embeddings_seq(ctx, seq)
                if not pointer:
                    raise BackendError("llama.cpp returned no pooled embedding")
                values = np.ctypeslib.as_array(pointer, (self.n_embd,)).astype(np.float64)
                norm = float(np.linalg.norm(values))
                if norm > 0:
                    values /= norm
                vectors.append(tuple(values.astype(np.float32).tolist()))
            return vectors
        finally:
            if memory:
                llama_cpp.llama_memory_clear(memory, True)

    def _context(self) -> Any:
        if self._ctx is not None:
            return self._ctx
        if self._pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK:
            raise UnsupportedFeature("embeddings", "this model is a reranker: it pools to a score")
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = self._pooling
        # One micro-batch holds a whole batch, so no input's pooling is split.
        params.n_ctx = self.max_tokens
        params.n_batch = self.max_tokens
        params.n_ubatch = self.max_tokens
        params.n_seq_max = self._max_sequences
        params.kv_unified = True  # the batch's sequences share the cells, whatever their sizes
        params.n_threads = self._threads
        params.n_threads_batch = self._threads
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise BackendError("llama.cpp could not create the embedding context")
        self._ctx = ctx
        self._batch = llama_cpp.llama_batch_init(self.max_tokens, 0, 1)
        log.info(
            "embedding_context_ready",
            pooling=_POOLING_NAMES.get(self._pooling, str(self._pooling)),
            max_tokens=self.max_tokens,
            max_sequences=self._max_sequences,
            n_embd=self.n_embd,
        )
        return ctx

    def close(self) -> None:
        with self._lock:
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx is not None:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None
