"""The llama.cpp backend (llama-cpp-python's low-level API): GGUF in, token events out."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import jinja2
import llama_cpp
import structlog
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_agent.engine.backends.llamacpp_batch import DecodeLoop, SequenceState
from edge_agent.engine.backends.llamacpp_sampling import SamplerChain, grammar_for
from edge_agent.engine.types import (
    BackendError,
    BackendInfo,
    ChatMessage,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    UnsupportedFeature,
)
from edge_agent.manifest import sha256_of

log = structlog.get_logger(__name__)


@functools.cache
def _quiet_llama_logs() -> None:
    """Route llama.cpp's own stderr chatter to nowhere; our structlog events say what matters."""

    def _drop(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    callback = llama_cpp.llama_log_callback(_drop)
    _quiet_llama_logs.callback = callback  # type: ignore[attr-defined]  # keep it alive
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


class LlamaCppBackend:
    """Serves a GGUF model with continuous batching over ``parallel`` KV streams."""

    def __init__(
        self,
        gguf_path: Path,
        *,
        context_length: int,
        parallel: int = 4,
        threads: int | None = None,
        prefix_cache: bool = True,
        n_batch: int = 512,
        expected_sha256: str | None = None,
    ) -> None:
        """``expected_sha256``: refuse to load a file whose digest differs (the manifest's)."""
        self._path = gguf_path
        self._expected_sha256 = expected_sha256
        self._n_ctx_seq = context_length
        self._parallel = parallel
        self._threads = threads or os.cpu_count() or 1
        self._prefix_cache = prefix_cache
        self._n_batch = max(n_batch, parallel + 64)
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._n_vocab = 0
        self._template: jinja2.Template | None = None
        self._bos = ""
        self._eos = ""
        self._loop_engine: DecodeLoop | None = None
        self._pieces: dict[int, bytes] = {}

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            name="llamacpp",
            context_length=self._n_ctx_seq,
            parallel=self._parallel,
            vocab_size=self._n_vocab,
            detail=f"llama-cpp-python {llama_cpp.__version__}, {self._threads} threads",
        )

    @property
    def decode_steps(self) -> int:
        return self._loop_engine.steps if self._loop_engine else 0

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        assert self._ctx is not None
        self._loop_engine = DecodeLoop(
            ctx=self._ctx,
            vocab=self._vocab,
            n_vocab=self._n_vocab,
            n_slots=self._parallel,
            n_ctx_seq=self._n_ctx_seq,
            n_batch=self._n_batch,
            prefix_cache=self._prefix_cache,
            token_bytes=self._token_bytes,
            loop=asyncio.get_running_loop(),
        )
        self._loop_engine.start()

    def _load(self) -> None:
        if not self._path.is_file():
            raise BackendError(f"model file not found: {self._path}")
        if self._expected_sha256 is not None:
            # /models reports the manifest's digest: serve only the weights it names.
            digest = sha256_of(self._path)
            if digest != self._expected_sha256:
                raise BackendError(
                    f"{self._path} has sha256 {digest}, the manifest says "
                    f"{self._expected_sha256} (a partial copy or other weights)"
                )
        _quiet_llama_logs()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(self._path).encode(), model_params)
        if not self._model:
            raise BackendError(f"llama.cpp could not load {self._path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = self._n_ctx_seq * self._parallel
        ctx_params.n_seq_max = self._parallel
        ctx_params.n_batch = self._n_batch
        ctx_params.n_ubatch = self._n_batch
        ctx_params.n_threads = self._threads
        ctx_params.n_threads_batch = self._threads
        # One KV stream per sequence: a sequence's cells never move with its neighbours.
        ctx_params.kv_unified = False
        # Flash attention's CPU kernel tiles multi-token batches, so a prompt's KV would
        # depend on how it was split into batches and prefix reuse would change greedy text.
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx_params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            raise BackendError("llama.cpp could not create a context (out of memory?)")
        actual = llama_cpp.llama_n_ctx_seq(self._ctx)
        if actual < self._n_ctx_seq:
            self._n_ctx_seq = actual
        template = llama_cpp.llama_model_chat_template(self._model, None)
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(template.decode("utf-8"))
        self._bos = self._special_text(llama_cpp.llama_vocab_bos(self._vocab))
        self._eos = self._special_text(llama_cpp.llama_vocab_eos(self._vocab))
        if b"LLAMAFILE = 1" in llama_cpp.llama_print_system_info():
            log.warning(
                "llamacpp_build_not_batch_invariant",
                detail="llama.cpp was built with LLAMAFILE: temperature-0 text may differ "
                "between a request alone and one batched with others; rebuild with "
                "CMAKE_ARGS=-DGGML_LLAMAFILE=OFF (scripts/bootstrap does)",
            )
        log.info(
            "model_loaded",
            path=str(self._path),
            n_vocab=self._n_vocab,
            context_per_sequence=self._n_ctx_seq,
            parallel=self._parallel,
            threads=self._threads,
            chat_template=self._template is not None,
        )

    async def close(self) -> None:
        # Joining the decode thread and freeing the KV cache take a while: off the loop.
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        if self._loop_engine is not None:
            self._loop_engine.stop()
            self._loop_engine = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # --- text <-> tokens -----------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(
            self._vocab, data, len(data), buffer, capacity, add_special, parse_special
        )
        if count < 0:
            raise BackendError("tokenizer buffer too small")
        return list(buffer[:count])

    def detokenize(self, token_ids: Sequence[int]) -> str:
        # llama.cpp aborts the whole process on an id outside the vocabulary.
        if any(not 0 <= t < self._n_vocab for t in token_ids):
            raise UnsupportedFeature("prompt_tokens", "token id outside the vocabulary")
        return b"".join(self._token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")

    def _token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
            if size < 0:
                buffer = ctypes.create_string_buffer(-size)
                size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -size, 0, False)
            piece = buffer.raw[:size]
            self._pieces[token] = piece
        return piece

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        buffer = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, True)
        return buffer.raw[: max(size, 0)].decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        if self._template is None:
            raise UnsupportedFeature("chat_template", "this model has no chat template")
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except jinja2.TemplateError as exc:
            raise UnsupportedFeature("chat_template", f"the template refuses them: {exc}") from None

    # --- generation ----------------------------------------------------------------------

    def check_supported(self, params: SamplingParams) -> None:
        grammar_for(params)  # raises UnsupportedFeature for a schema llama.cpp can't enforce
        for token in params.logit_bias:
            if not 0 <= token < self._n_vocab:
                raise UnsupportedFeature(
                    "logit_bias", f"token id {token} is not in the vocabulary"
                )

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        engine = self._loop_engine
        if engine is None:
            raise BackendError("model is not loaded")
        inbox: asyncio.Queue[list[TokenEvent] | BaseException] = asyncio.Queue()
        sampler = SamplerChain(
            self._vocab, self._n_vocab, request.params, grammar_for(request.params)
        )
        sequence = SequenceState(request=request, sampler=sampler, deliver=inbox.put_nowait)
        engine.submit(sequence)
        finished = False
        try:
            while not finished:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                for event in item:
                    finished = event.finish_reason is not None
                    yield event
        finally:
            if not finished:
                sequence.cancelled = True


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)
