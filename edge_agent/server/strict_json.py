"""JSON as the RFC writes it, before any model reads it: what pydantic would let through.

Pydantic's parser keeps the last of two equal keys, and both parsers take ``NaN`` and
``Infinity`` and integers of any length. A body carrying those is refused with a 400
naming the fault, never read one way by the validator and another by the log.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Integers beyond 64 bits fit no field the engines take (seeds, token ids, counts).
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


class StrictJsonError(ValueError):
    """The body is not strict JSON; the message says why, for the client."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise StrictJsonError(f"request body has the key {key!r} twice in one object")
        result[key] = value
    return result


def _constant(name: str) -> Any:
    raise StrictJsonError(f"request body is not valid JSON: {name} is not a JSON number")


def _integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # past Python's digit limit for int()
        raise StrictJsonError("request body has an integer too large for any field") from None
    if not _INT_MIN <= value <= _INT_MAX:
        raise StrictJsonError("request body has an integer too large for any field")
    return value


def _real(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJsonError(f"request body has a number out of range: {text[:40]}")
    return value


def loads_strict(raw: bytes | str) -> Any:
    """The parsed body, or StrictJsonError: bad UTF-8 or JSON, repeated keys, NaN, huge numbers."""
    try:
        return json.loads(
            raw,
            object_pairs_hook=_no_duplicates,
            parse_constant=_constant,
            parse_int=_integer,
            parse_float=_real,
        )
    except StrictJsonError:
        raise
    except RecursionError:
        raise StrictJsonError("request body is nested too deeply") from None
    except UnicodeDecodeError:
        raise StrictJsonError("request body is not valid UTF-8") from None
    except ValueError as exc:
        raise StrictJsonError(f"request body is not valid JSON: {exc}") from None
