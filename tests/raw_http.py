"""A bare HTTP client on a socket: the request line, headers and body exactly as sent.

aiohttp's own client speaks HTTP/1.1 and hides the framing; the SSE tests need to
see what an HTTP/1.0 client (curl --http1.0, an old proxy) gets byte for byte.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

HTTP_VERSIONS = ("1.0", "1.1")


@dataclass
class RawResponse:
    version: str
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes  # de-chunked when the server sent chunks
    closed_by_server: bool


async def post_json(
    host: str, port: int, path: str, body: dict[str, Any], *, http_version: str
) -> RawResponse:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/{http_version}\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    )
    if http_version == "1.1":
        head += "Connection: close\r\n"  # so reading to the end terminates; framing is the same
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 60)  # until the server closes
    finally:
        writer.close()
    header_block, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        rest = _dechunk(rest)
    return RawResponse(version.removeprefix("HTTP/"), int(status), headers, rest, True)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        assert data[size : size + 2] == b"\r\n", "each chunk ends with CRLF"
        data = data[size + 2 :]


async def exchange(
    host: str, port: int, request: bytes, *, within_s: float = 30.0, half_close: bool = False
) -> RawResponse | None:
    """Send ``request`` as is and read the first response; None when the server answers nothing.

    ``half_close`` shuts the client's sending side after the request, as a client does
    that has nothing more to send (the server then sees the end of a truncated body).
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(_read_response(reader), within_s)
    except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> RawResponse | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None  # closed without a word
        raise
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    version, status, *_ = status_line.split(" ")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        raw = bytearray()
        while not raw.endswith(b"0\r\n\r\n"):
            chunk = await reader.read(65536)
            if not chunk:
                break
            raw += chunk
        body = _dechunk(bytes(raw))
    else:
        body = await reader.read()
    closed = headers.get("connection", "").lower() == "close"
    return RawResponse(version.removeprefix("HTTP/"), int(status), headers, body, closed)
