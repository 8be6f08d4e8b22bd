"""The native surface, ``POST /infer``: pandas-records rows in and out (CONTRACT.md section 5)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, RootModel


class NativeInput(BaseModel):
    """One pandas-records row sent to ``/infer``; other columns are ignored."""

    model_config = ConfigDict(extra="allow")
    text: Annotated[str, Field(min_length=1)]


class NativeRecords(RootModel[list[NativeInput]]):
    """The request body: at least one row."""

    root: list[NativeInput] = Field(min_length=1)


class NativeIn(BaseModel):
    text: str


class NativeOut(BaseModel):
    generated_text: str


class NativeAnomaly(BaseModel):
    count: int


class NativeMetadata(BaseModel):
    last_model: str = Field(description="JSON string with model_name and model_sha")
    pipeline_version: str
    elapsed: list[int] = Field(description="nanoseconds spent on the record")
    dropped: list[Any]
    partition: str = Field(description="the box's host name")


class NativeOutput(BaseModel):
    """One pandas-records row answered by ``/infer``."""

    model_config = ConfigDict(populate_by_name=True)
    time: int = Field(description="epoch milliseconds")
    in_: NativeIn = Field(alias="in")
    out: NativeOut
    anomaly: NativeAnomaly
    metadata: NativeMetadata


class NativeOutputs(RootModel[list[NativeOutput]]):
    """The response body: one row per input row."""
