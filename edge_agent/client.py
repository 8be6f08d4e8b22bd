"""The Python SDK for one edge box: the product doc's pipeline methods over the box's HTTP API.

``EdgePipeline(url)`` stands in for the platform's pipeline object::

    pipeline = EdgePipeline("http://edge-box:8080")
    pipeline.openai_chat_completion(messages=[{"role": "user", "content": "hi"}])
    pipeline.openai_completion(prompt="tell me a story", max_tokens=100, stream=True)
    pipeline.logs().iloc[-1]["out.json"]
    pipeline.logs(start_datetime=yesterday, end_datetime=now, limit=5000)
    pipeline.stats(window="24h")          # ttft/tps median and p95 per bucket, a DataFrame
    pipeline.generate_api_spec()          # ./<pipeline>.yaml

The OpenAI methods delegate to the ``openai`` package, so they return its own typed
objects and raise its own exceptions. The box's other endpoints go through the same
package's generic HTTP client, so their failures are the same ``openai`` exception types
carrying the server's message (``openai.BadRequestError``, ``openai.NotFoundError``...).
"""

from __future__ import annotations

import datetime as dt
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


# The most records one GET /logs answers; larger limits are read page by page.
_PAGE = 1000


def _epoch_ms(value: dt.datetime | None) -> int | None:
    # A naive datetime is local time, as datetime.timestamp() takes it.
    return None if value is None else int(value.timestamp() * 1000)


def _log_query(
    limit: int, start: dt.datetime | None, end: dt.datetime | None, before: str | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": min(limit, _PAGE)}
    for name, value in (("start", _epoch_ms(start)), ("end", _epoch_ms(end))):
        if value is not None:
            params[name] = value
    if before is not None:
        params["before"] = before
    return params


def _stats_frame(body: object) -> pandas.DataFrame:
    """One row per time bucket that saw requests: percentiles, counts, outcomes, tokens."""
    pandas = _load_pandas()
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise TypeError(f"unexpected /stats answer: {body!r}")
    rows: dict[int, dict[str, Any]] = {}
    for point in body["requests"]:
        row = rows.setdefault(point["time"], {})
        row["requests"] = point["total"]
        for status, count in point["by_status"].items():
            row[status] = count
        row["prompt_tokens"] = point["prompt_tokens"]
        row["completion_tokens"] = point["completion_tokens"]
    for metric in ("ttft", "tps"):
        for point in body[metric]:
            row = rows.setdefault(point["time"], {})
            for key in ("p50", "p95", "count"):
                row[f"{metric}_{key}"] = point[key]
    columns = [
        "ttft_p50", "ttft_p95", "ttft_count", "tps_p50", "tps_p95", "tps_count",
        "requests", "ok", "error", "cancelled", "prompt_tokens", "completion_tokens",
    ]  # fmt: skip
    frame = pandas.DataFrame.from_dict(rows, orient="index")
    frame = frame.reindex(columns=columns + [c for c in frame.columns if c not in columns])
    counts = [c for c in frame.columns if not c.endswith(("_p50", "_p95"))]
    frame[counts] = frame[counts].fillna(0).astype("int64")
    frame.index = pandas.to_datetime(frame.index.astype("int64"), unit="ms", utc=True)
    frame.index.name = "time"
    return frame.sort_index()


def _logs_frame(records: list[dict[str, Any]]) -> pandas.DataFrame:
    pandas = _load_pandas()
    # The box answers newest first; the platform SDK's frame is oldest first, so that
    # ``logs().iloc[-1]`` is the most recent request (as the product doc uses it).
    frame = pandas.json_normalize(list(reversed(records)))
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


def _log_page(value: object) -> tuple[list[dict[str, Any]], bool]:
    """The records of one ``GET /logs`` answer, and whether older ones are left."""
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        return _records(value["data"]), bool(value.get("has_more"))
    raise TypeError(f"unexpected /logs answer: {value!r}")


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

    def logs(
        self,
        limit: int = 100,
        *,
        start_datetime: dt.datetime | None = None,
        end_datetime: dt.datetime | None = None,
    ) -> pandas.DataFrame:
        """The ``limit`` most recent inference records as a DataFrame, oldest first.

        ``start_datetime`` (inclusive) and ``end_datetime`` (exclusive) bound the records'
        acceptance time; a ``limit`` over 1000 is read page by page. Columns are the
        records flattened with dots: ``time``, ``in.*``, ``out.json``, ``params.*``,
        ``metrics.ttft``, ``metrics.tps``, ``status``...
        """
        _load_pandas()  # fail before the request when pandas is missing
        records: list[dict[str, Any]] = []
        before: str | None = None
        while True:  # at least once: a limit below 1 gets the box's own 400
            query = _log_query(limit - len(records), start_datetime, end_datetime, before)
            page = self._http().get("/logs", cast_to=object, options={"params": query})
            found, has_more = _log_page(page)
            records.extend(found)
            if not found or not has_more or len(records) >= limit:
                break
            before = found[-1]["id"]
        return _logs_frame(records)

    def stats(self, window: str = "1h", step: str | None = None) -> pandas.DataFrame:
        """ttft and tps (median, p95, count), requests by outcome and tokens per time bucket.

        ``window`` is ``15m``, ``1h``, ``24h``, ``7d`` (or any span up to 7d); ``step`` the
        bucket width (the box picks one when left out). Indexed by bucket start (UTC).
        """
        _load_pandas()
        params = {"window": window} | ({"step": step} if step else {})
        body = self._http().get("/stats", cast_to=object, options={"params": params})
        return _stats_frame(body)

    def status(self) -> dict[str, Any]:
        """The box right now: readiness, model, engine, queue, inference log and uploads."""
        body = self._http().get("/status", cast_to=object)
        if not isinstance(body, dict):
            raise TypeError(f"unexpected /status answer: {body!r}")
        return body

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

    async def logs(
        self,
        limit: int = 100,
        *,
        start_datetime: dt.datetime | None = None,
        end_datetime: dt.datetime | None = None,
    ) -> pandas.DataFrame:
        _load_pandas()
        records: list[dict[str, Any]] = []
        before: str | None = None
        while True:  # at least once: a limit below 1 gets the box's own 400
            query = _log_query(limit - len(records), start_datetime, end_datetime, before)
            page = await self._http().get("/logs", cast_to=object, options={"params": query})
            found, has_more = _log_page(page)
            records.extend(found)
            if not found or not has_more or len(records) >= limit:
                break
            before = found[-1]["id"]
        return _logs_frame(records)

    async def stats(self, window: str = "1h", step: str | None = None) -> pandas.DataFrame:
        _load_pandas()
        params = {"window": window} | ({"step": step} if step else {})
        body = await self._http().get("/stats", cast_to=object, options={"params": params})
        return _stats_frame(body)

    async def status(self) -> dict[str, Any]:
        body = await self._http().get("/status", cast_to=object)
        if not isinstance(body, dict):
            raise TypeError(f"unexpected /status answer: {body!r}")
        return body

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
