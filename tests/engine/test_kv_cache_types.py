"""The KV cache type setting: what it asks of llama.cpp, and what it refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edge_agent.config import Settings
from edge_agent.engine.backends.llamacpp_engine import kv_cache_types
from edge_agent.engine.types import BackendError

F16, BF16, Q8_0, Q4_0 = 1, 30, 8, 2


@pytest.mark.parametrize(
    ("name", "expected"),
    [("f16", (F16, F16)), ("bf16", (BF16, BF16)), ("q8_0", (Q8_0, F16)), ("q4_0", (Q4_0, F16))],
)
def test_a_quantized_type_quantizes_the_keys_and_keeps_values_f16(
    name: str, expected: tuple[int, int]
) -> None:
    assert kv_cache_types(name) == expected


def test_an_unknown_type_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="q2_k"):
        kv_cache_types("q2_k")


def test_the_setting_refuses_a_type_the_engine_does_not_offer() -> None:
    assert Settings().kv_cache_type == "f16"
    with pytest.raises(ValidationError, match="kv_cache_type"):
        Settings(kv_cache_type="q2_k")  # type: ignore[arg-type]
