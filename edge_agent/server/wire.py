"""A protocol model as an aiohttp response: the one way a route sends a JSON body."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from pydantic import BaseModel


def json_response(
    body: BaseModel,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    exclude_none: bool = False,
) -> web.Response:
    """``body`` serialised by its own model, under its wire names (``in``, ``json``)."""
    return web.Response(
        text=body.model_dump_json(by_alias=True, exclude_none=exclude_none),
        status=status,
        headers=headers,
        content_type="application/json",
    )
