"""How much memory a model will take, and how much this box has left: may two models fit?

The estimate is the GGUF file (llama.cpp maps all of it) plus the KV cache its slots
allocate up front plus a margin for compute buffers; the room is ``MemAvailable``,
bounded by the service's cgroup limit where systemd set one (``MemoryMax``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_agent.engine.gguf_header import read_header

# Bytes per KV element by llama.cpp cache type; quantized types apply to K only (the
# engine keeps V in f16 without flash attention).
_KV_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
_COMPUTE_MARGIN = 1.10
_COMPUTE_FLOOR = 64 * 1024**2


@dataclass(frozen=True, slots=True)
class ModelShape:
    layers: int
    kv_heads: int
    key_length: int
    value_length: int

    def kv_bytes_per_token(self, kv_cache_type: str) -> float:
        per_layer = self.kv_heads * (
            self.key_length * _KV_BYTES[kv_cache_type] + self.value_length * _KV_BYTES["f16"]
        )
        return self.layers * per_layer


def read_shape(path: Path) -> ModelShape:
    """The attention shape from a GGUF's header."""
    header = read_header(path)

    def value(key: str, default: int | None = None) -> int:
        found = header.get(key)
        if found is None:
            if default is None:
                raise ValueError(f"{path.name}: no {key} in the GGUF header")
            return default
        return int(found)

    arch = str(header.get("general.architecture", ""))
    heads = value(f"{arch}.attention.head_count")
    width = value(f"{arch}.embedding_length")
    head_size = width // heads
    return ModelShape(
        layers=value(f"{arch}.block_count"),
        kv_heads=value(f"{arch}.attention.head_count_kv", heads),
        key_length=value(f"{arch}.attention.key_length", head_size),
        value_length=value(f"{arch}.attention.value_length", head_size),
    )


def model_bytes(path: Path, *, context_length: int, slots: int, kv_cache_type: str) -> int:
    """About what serving this GGUF takes: weights, every slot's KV cache, buffers."""
    shape = read_shape(path)
    kv = shape.kv_bytes_per_token(kv_cache_type) * context_length * slots
    weights = path.stat().st_size
    return int(max((weights + kv) * _COMPUTE_MARGIN, weights + kv + _COMPUTE_FLOOR))


def available_bytes() -> int:
    """Memory a new model may take now: MemAvailable, within the cgroup's limit."""
    room = _meminfo_available()
    cgroup = _cgroup_room()
    return min(room, cgroup) if cgroup is not None else room


def _meminfo_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def _cgroup_room() -> int | None:
    try:
        with open("/proc/self/cgroup", encoding="ascii") as handle:
            relative = handle.read().strip().split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / relative.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, IndexError, ValueError):
        return None
