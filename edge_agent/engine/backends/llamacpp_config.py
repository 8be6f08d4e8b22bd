"""The llama.cpp CPU configurations a box may serve with, fastest first.

llama.cpp's fastest CPU path repacks weights into the layout of an *extra buffer
type* at load time: AMX tiles on Xeons that have AMX, interleaved rows for the AVX2 /
AVX-512 / NEON kernels elsewhere (``CPU_REPACK``). On some CPUs that path crashes on the
first decode (docs/engine.md), so the daemon serves the fastest configuration that has
decoded on this box in a process allowed to crash, and falls back down this ladder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import llama_cpp

ConfigName = Literal["repack", "no_repack", "plain"]
CpuRepack = Literal["auto", "on", "off"]


@dataclass(frozen=True, slots=True)
class CpuConfig:
    """One way to load the model on the CPU; ``apply`` sets it on llama_model_params."""

    name: ConfigName
    description: str
    use_extra_bufts: bool
    load_mode: int
    check_tensors: bool

    def apply(self, model_params: Any) -> None:
        model_params.use_extra_bufts = self.use_extra_bufts
        model_params.load_mode = self.load_mode
        model_params.check_tensors = self.check_tensors


REPACK = CpuConfig(
    "repack",
    "weights repacked into llama.cpp's extra buffer types (AMX, CPU_REPACK)",
    use_extra_bufts=True,
    load_mode=llama_cpp.LLAMA_LOAD_MODE_AUTO,
    check_tensors=False,
)
NO_REPACK = CpuConfig(
    "no_repack",
    "weights as stored in the GGUF, ggml's own CPU kernels (extra buffer types off)",
    use_extra_bufts=False,
    load_mode=llama_cpp.LLAMA_LOAD_MODE_AUTO,
    check_tensors=False,
)
# The last resort: nothing a box could get wrong beyond the kernels themselves. The
# weights are read into private memory (no mmap of a file another process may change)
# and every tensor's data is validated on load.
PLAIN = CpuConfig(
    "plain",
    "weights as stored, read into memory and validated, no extra buffer types",
    use_extra_bufts=False,
    load_mode=llama_cpp.LLAMA_LOAD_MODE_NONE,
    check_tensors=True,
)

CONFIGS: dict[str, CpuConfig] = {c.name: c for c in (REPACK, NO_REPACK, PLAIN)}


def ladder(cpu_repack: CpuRepack) -> tuple[CpuConfig, ...]:
    """The configurations to try for the ``cpu_repack`` setting, fastest first.

    ``on`` pins the repacked path (no fallback: the operator asked for it); ``off``
    never repacks but may still fall back to the plain path.
    """
    if cpu_repack == "on":
        return (REPACK,)
    if cpu_repack == "off":
        return (NO_REPACK, PLAIN)
    return (REPACK, NO_REPACK, PLAIN)
