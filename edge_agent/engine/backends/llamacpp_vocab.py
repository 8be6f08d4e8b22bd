"""A GGUF's tokenizer and chat template, from a llama.cpp model handle.

The daemon keeps one of these in its own process, loaded with ``vocab_only`` (no
weights, no kernels, nothing that can crash in a decode), so tokenizing, counting and
rendering chat stay synchronous and local while the weights live in the engine process.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp

from edge_agent.engine.backends.llamacpp_sampling import grammar_for
from edge_agent.engine.chat_template import ChatTemplate
from edge_agent.engine.types import (
    BackendError,
    ChatMessage,
    SamplingParams,
    ToolCallFormat,
    ToolSpec,
    UnsupportedFeature,
)


@functools.cache
def quiet_llama_logs() -> None:
    """Route llama.cpp's own stderr chatter to nowhere; our structlog events say what matters."""

    def _drop(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    set_llama_log_callback(_drop)


def set_llama_log_callback(handler: Any) -> None:
    """Install ``handler(level, text, user_data)`` as llama.cpp's log hook (kept alive here)."""
    callback = llama_cpp.llama_log_callback(handler)
    _LOG_CALLBACKS.append(callback)  # ctypes would free a callback nobody references
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


_LOG_CALLBACKS: list[Any] = []


def load_vocab_only(path: Path) -> Any:
    """A model handle with the tokenizer and metadata only; free with llama_model_free."""
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise BackendError(f"llama.cpp could not read the vocabulary of {path}")
    return model


class Vocabulary:
    """Text <-> token ids, special tokens and the chat template of one loaded model."""

    def __init__(self, model: Any) -> None:
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._pieces: dict[int, bytes] = {}
        self._template: ChatTemplate | None = None
        template = llama_cpp.llama_model_chat_template(model, None)
        if template:
            self._template = ChatTemplate(
                template.decode("utf-8"),
                bos_token=self._special_text(llama_cpp.llama_vocab_bos(self._vocab)),
                eos_token=self._special_text(llama_cpp.llama_vocab_eos(self._vocab)),
            )

    @property
    def handle(self) -> Any:
        return self._vocab

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

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
        if any(not 0 <= t < self.n_vocab for t in token_ids):
            raise UnsupportedFeature("prompt_tokens", "token id outside the vocabulary")
        return b"".join(self.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
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

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        buffer = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, True)
        return buffer.raw[: max(size, 0)].decode("utf-8", errors="replace")

    @property
    def tool_call_format(self) -> ToolCallFormat | None:
        return None if self._template is None else self._template.tool_call_format

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        add_generation_prompt: bool = True,
    ) -> str:
        if self._template is None:
            raise UnsupportedFeature("chat_template", "this model has no chat template")
        return self._template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt
        )

    def check_supported(self, params: SamplingParams) -> None:
        grammar = grammar_for(params)  # raises UnsupportedFeature for a schema it can't convert
        if grammar is not None:
            # Compiled here too, so a grammar llama.cpp refuses is a 400 before admission,
            # named after the request field it came from, not a failure in the engine.
            sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
            if not sampler:
                raise UnsupportedFeature("structured_output", "the grammar does not compile")
            llama_cpp.llama_sampler_free(sampler)
        for token in params.logit_bias:
            if not 0 <= token < self.n_vocab:
                raise UnsupportedFeature("logit_bias", f"token id {token} is not in the vocabulary")
