"""The OpenAI embeddings surface: ``POST /infer/openai/v1/embeddings``, as OpenAI shapes it.

Requests validate strictly and accept unknown fields, as the other OpenAI requests do.
The input limits in the types (at most 2048 inputs, none empty) are OpenAI's own; how
many tokens one input may have is the model's (``[embedding] max_input_tokens``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_INPUTS = 2048  # OpenAI's limit on one request's inputs

Text = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
EmbeddingInput = (
    Text
    | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]
)


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    input: EmbeddingInput = Field(
        description="a string, a list of strings, token ids, or a list of token id lists"
    )
    model: str | None = None
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: each vector as little-endian float32 bytes"
    )
    dimensions: int | None = Field(
        default=None, ge=1, description="only the model's own vector length is accepted"
    )
    user: str | None = None

    def for_log(self) -> dict[str, Any]:
        """The record's ``params``: what shapes the answer, not the inputs themselves."""
        return {"encoding_format": self.encoding_format, "dimensions": self.dimensions}


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(
        description="the vector (L2-normalised); a base64 string when encoding_format is base64"
    )


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
