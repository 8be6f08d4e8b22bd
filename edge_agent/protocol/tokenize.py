"""``POST /tokenize`` and ``/detokenize``: vLLM's shapes, so clients can count and trim.

A tokenize body holds either a ``prompt`` (tokenized as the completions endpoint does)
or chat ``messages`` (rendered by the model's chat template, as chat completions does,
with ``tools`` offered the same way), and gets the ids, their count and the window.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.protocol.openai import FunctionTool, Message


class _Request(BaseModel):
    # As the OpenAI requests: strict types, unknown fields accepted and ignored.
    model_config = ConfigDict(extra="allow", strict=True)


class TokenizePromptRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(
        default=True, description="add the model's BOS (or other special tokens) as completions do"
    )
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    add_generation_prompt: bool = Field(
        default=True, description="end with the assistant's turn opened, as chat completions does"
    )
    add_special_tokens: bool = Field(
        default=False, description="the template writes its own special tokens"
    )
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="the context window, tokens per sequence")
    tokens: list[int]
    token_strs: list[str] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="each token's text, when return_token_strs is true",
    )


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
