"""The key-value header of a GGUF file, read without loading the file.

A model swap sizes its candidate from the header (layers, heads) while the old model
serves; arrays (the tokenizer's 50k strings) are skipped rather than decoded, so this
takes milliseconds and holds the GIL for little of them.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9

Scalar = int | float | bool | str


def read_header(path: Path) -> dict[str, Scalar]:
    """The header's scalar and string values by key (arrays are left out)."""
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path.name}: not a GGUF file")
        (version,) = struct.unpack("<I", handle.read(4))
        if version < 2:
            raise ValueError(f"{path.name}: GGUF version {version} is too old")
        _tensors, count = struct.unpack("<QQ", handle.read(16))
        values: dict[str, Scalar] = {}
        for _ in range(count):
            key = _string(handle)
            (kind,) = struct.unpack("<I", handle.read(4))
            if kind == _ARRAY:
                _skip_array(handle)
            else:
                values[key] = _value(handle, kind)
        return values


def _string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", handle.read(8))
    return handle.read(length).decode("utf-8", errors="replace")


def _value(handle: BinaryIO, kind: int) -> Scalar:
    if kind == _STRING:
        return _string(handle)
    fmt = _SCALARS.get(kind)
    if fmt is None:
        raise ValueError(f"unknown GGUF value type {kind}")
    value: Scalar = struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]
    return value


def _skip_array(handle: BinaryIO) -> None:
    kind, count = struct.unpack("<IQ", handle.read(12))
    if kind == _STRING:
        for _ in range(count):
            (length,) = struct.unpack("<Q", handle.read(8))
            handle.seek(length, 1)
    elif kind == _ARRAY:
        for _ in range(count):
            _skip_array(handle)
    elif kind in _SCALARS:
        handle.seek(struct.calcsize(_SCALARS[kind]) * count, 1)
    else:
        raise ValueError(f"unknown GGUF array type {kind}")
