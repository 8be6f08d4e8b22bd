"""The Python SDK for one edge box: the product doc's pipeline methods over the box's HTTP API.

``EdgePipeline(url)`` stands in for the platform's pipeline object::

    pipeline = EdgePipeline("http://edge-box:8080")
    pipeline.openai_chat_completion(messages=[{"role": "user", "content": "hi"}])
    pipeline.openai_completion(prompt="tell me a story", max_tokens=100, stream=True)
    pipeline.logs().iloc[-1]["out.json"]
    pipeline.generate_api_spec()          # ./<pipeline>.yaml

The OpenAI methods delegate to the ``openai`` package, so they return its own typed
objects and raise its own exceptions. The box's other endpoints go through the same
package's generic HTTP client, so their failures are the same ``openai`` exception types
carrying the server's message (``openai.BadRequestError``, ``openai.NotFoundError``...).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import openai
from openai import AsyncStream, Stream
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

if TYPE_CHECKING:
    import pandas

OPENAI_PATH = "/infer/openai/v1"
# The box needs no key unless a bearer token is configured; the SDK insists on one.
PLACEHOLDER_API_KEY = "edge-agent"
# The body's model is ignored by the box (CONTRACT.md section 2); the SDK requires one.
DEFAULT_MODEL = ""


def _load_pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError(
            "EdgePipeline.logs() returns a pandas DataFrame: install pandas "
            "(pip install 'edge-agent[sdk]' or pip install pandas)"
        ) from None
    return pandas


def _logs_frame(records: list[dict[str, Any]]) -> pandas.DataFrame:
    pandas = _load_pandas()
    # POST /logs answers oldest first, as the platform SDK's frame is ordered, so that
    # ``logs().iloc[-1]`` is the most recent request (as the product doc uses it).
    frame = pandas.json_normalize(records)
    if "time" in frame.columns:
        frame["time"] = pandas.to_datetime(frame["time"], unit="ms", utc=True)
    return frame


class _Base:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        pipeline: str | None = None,
        *,
        timeout: float = 600.0,
        max_retries: int = 2,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._pipeline = pipeline
        self._timeout = timeout
        self._max_retries = max_retries

    def _client_args(self, base_url: str) -> dict[str, Any]:
        return {
            "base_url": base_url,
            "api_key": self.token or PLACEHOLDER_API_KEY,
            "timeout": self._timeout,
            "max_retries": self._max_retries,
        }

    def _infer_path(self) -> str:
        # A named pipeline goes to /pipelines/<name>, so a wrong name is a 404, not a
        # silent answer from whatever the box runs.
        if self._pipeline is None:
            return "/infer"
        return f"/pipelines/{quote(self._pipeline, safe='')}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, pipeline={self._pipeline!r})"


def _with_model(params: dict[str, Any]) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, **params}


def _records(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        raise TypeError(f"expected pandas-records (a list of objects), got {type(value).__name__}")
    return value


def _pipeline_id(value: object) -> str:
    if isinstance(value, dict):
        pipelines = value.get("pipelines")
        if isinstance(pipelines, list) and pipelines and isinstance(pipelines[0], dict):
            name = pipelines[0].get("id")
            if isinstance(name, str):
                return name
    raise TypeError(f"unexpected /pipelines answer: {value!r}")


# The product doc's request for log records: a filter object, records answered.
LOGS_PATH = "/logs"
PANDAS_RECORDS = {"Content-Type": "application/json; format=pandas-records"}


class EdgePipeline(_Base):
    """A pipeline on one edge box, with the product doc's SDK methods."""

    _openai: openai.OpenAI | None = None
    _root: openai.OpenAI | None = None

    def openai_client(self) -> openai.OpenAI:
        """An ``openai.OpenAI`` client for this box's ``/infer/openai/v1`` endpoints."""
        if self._openai is None:
            self._openai = openai.OpenAI(**self._client_args(self.url + OPENAI_PATH))
        return self._openai

    def async_openai_client(self) -> openai.AsyncOpenAI:
        """A fresh ``openai.AsyncOpenAI`` client for the same endpoints."""
        return openai.AsyncOpenAI(**self._client_args(self.url + OPENAI_PATH))

    def _http(self) -> openai.OpenAI:
        # The same package's client rooted at the box, for the non-OpenAI paths: its
        # retries, timeouts and error mapping then match the OpenAI calls exactly.
        if self._root is None:
            self._root = openai.OpenAI(**self._client_args(self.url))
        return self._root

    def openai_chat_completion(self, **params: Any) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """``chat.completions.create`` on the box; ``model`` may be left out."""
        result: ChatCompletion | Stream[ChatCompletionChunk] = (
            self.openai_client().chat.completions.create(**_with_model(params))
        )
        return result

    def openai_completion(self, **params: Any) -> Completion | Stream[Completion]:
        """``completions.create`` on the box; ``model`` may be left out."""
        result: Completion | Stream[Completion] = self.openai_client().completions.create(
            **_with_model(params)
        )
        return result

    def pipeline_name(self) -> str:
        """The pipeline's name: the one given, else the box's (``GET /pipelines``)."""
        if self._pipeline is None:
            return _pipeline_id(self._http().get("/pipelines", cast_to=object))
        return self._pipeline

    def infer(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Native inference (OpenAI compatibility off): pandas-records in, records out."""
        answer = self._http().post(self._infer_path(), cast_to=object, body=records)
        return _records(answer)

    def logs(self, limit: int = 100) -> pandas.DataFrame:
        """The ``limit`` most recent inference records as a DataFrame, oldest first.

        Columns are the records flattened with dots: ``time``, ``in.*``, ``out.json``,
        ``params.*``, ``metrics.ttft``, ``metrics.tps``, ``status``...
        """
        _load_pandas()  # fail before the request when pandas is missing
        answer = self._http().post(
            LOGS_PATH, cast_to=object, body={"limit": limit}, options={"headers": PANDAS_RECORDS}
        )
        return _logs_frame(_records(answer))

    def generate_api_spec(self, path: str | Path | None = None) -> Path:
        """Write the box's OpenAPI 3.1.1 YAML to ``path`` (default ``./<pipeline>.yaml``)."""
        text = self._http().get("/openapi.yaml", cast_to=str)
        target = Path(path) if path is not None else Path(f"{self.pipeline_name()}.yaml")
        target.write_text(text, encoding="utf-8")
        return target

    def close(self) -> None:
        for client in (self._openai, self._root):
            if client is not None:
                client.close()
        self._openai = self._root = None

    def __enter__(self) -> EdgePipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncEdgePipeline(_Base):
    """``EdgePipeline`` for asyncio code: the same methods, awaited."""

    _openai: openai.AsyncOpenAI | None = None
    _root: openai.AsyncOpenAI | None = None

    def openai_client(self) -> openai.AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` client for this box's ``/infer/openai/v1`` endpoints."""
        if self._openai is None:
            self._openai = openai.AsyncOpenAI(**self._client_args(self.url + OPENAI_PATH))
        return self._openai

    def async_openai_client(self) -> openai.AsyncOpenAI:
        return self.openai_client()

    def _http(self) -> openai.AsyncOpenAI:
        if self._root is None:
            self._root = openai.AsyncOpenAI(**self._client_args(self.url))
        return self._root

    async def openai_chat_completion(
        self, **params: Any
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        result: (
            ChatCompletion | AsyncStream[ChatCompletionChunk]
        ) = await self.openai_client().chat.completions.create(**_with_model(params))
        return result

    async def openai_completion(self, **params: Any) -> Completion | AsyncStream[Completion]:
        result: (
            Completion | AsyncStream[Completion]
        ) = await self.openai_client().completions.create(**_with_model(params))
        return result

    async def pipeline_name(self) -> str:
        if self._pipeline is None:
            return _pipeline_id(await self._http().get("/pipelines", cast_to=object))
        return self._pipeline

    async def infer(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answer = await self._http().post(self._infer_path(), cast_to=object, body=records)
        return _records(answer)

    async def logs(self, limit: int = 100) -> pandas.DataFrame:
        _load_pandas()
        answer = await self._http().post(
            LOGS_PATH, cast_to=object, body={"limit": limit}, options={"headers": PANDAS_RECORDS}
        )
        return _logs_frame(_records(answer))

    async def generate_api_spec(self, path: str | Path | None = None) -> Path:
        text = await self._http().get("/openapi.yaml", cast_to=str)
        target = Path(path) if path is not None else Path(f"{await self.pipeline_name()}.yaml")
        target.write_text(text, encoding="utf-8")
        return target

    async def close(self) -> None:
        for client in (self._openai, self._root):
            if client is not None:
                await client.close()
        self._openai = self._root = None

    async def __aenter__(self) -> AsyncEdgePipeline:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
