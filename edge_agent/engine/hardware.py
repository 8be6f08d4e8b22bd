"""What accelerator this box has: a CUDA GPU probe that never raises.

The probe asks NVML first (``nvidia-ml-py``, in-process and fast) and falls back to
``nvidia-smi``; a box without the driver, the library or the binary simply has no
GPU. It does not import torch or vLLM: choosing a backend must stay cheap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

NVIDIA_SMI_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class GpuDevice:
    index: int
    name: str
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """The CUDA GPUs visible to this process, and how we learned of them."""

    devices: tuple[GpuDevice, ...]
    source: str  # "nvml" or "nvidia-smi"

    @property
    def count(self) -> int:
        return len(self.devices)

    @property
    def name(self) -> str:
        return self.devices[0].name

    @property
    def memory_bytes(self) -> int:
        """Memory of the first device, the one a single-GPU engine uses."""
        return self.devices[0].memory_bytes

    def describe(self) -> str:
        gib = self.memory_bytes / 1024**3
        prefix = f"{self.count}x " if self.count > 1 else ""
        return f"{prefix}{self.name} ({gib:.1f} GiB)"


def probe_gpu() -> GpuInfo | None:
    """The visible CUDA GPUs, or None when there are none or they cannot be queried."""
    visible = _visible_indices()
    if visible == ():
        return None  # CUDA_VISIBLE_DEVICES hides every device
    for probe in (_probe_nvml, _probe_nvidia_smi):
        try:
            devices = probe()
        except Exception as exc:  # a broken driver is "no GPU", never a crash at start
            log.debug("gpu_probe_failed", probe=probe.__name__, error=str(exc))
            continue
        if devices is None:
            continue
        if visible is not None:
            devices = [d for d in devices if d.index in visible]
        if devices:
            source = "nvml" if probe is _probe_nvml else "nvidia-smi"
            return GpuInfo(devices=tuple(devices), source=source)
        return None
    return None


def _visible_indices() -> frozenset[int] | tuple[()] | None:
    """Indices allowed by CUDA_VISIBLE_DEVICES; None: all; (): none."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    indices: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.lstrip("-").isdigit():
            return None  # UUIDs or MIG ids: let CUDA decide, count every device
        number = int(part)
        if number < 0:
            break  # CUDA stops at the first invalid index
        indices.add(number)
    return frozenset(indices) if indices else ()


def _probe_nvml() -> list[GpuDevice] | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    nvml: Any = pynvml
    nvml.nvmlInit()
    try:
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # older bindings return bytes
                name = name.decode("utf-8", errors="replace")
            memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            devices.append(GpuDevice(index=index, name=str(name), memory_bytes=memory))
        return devices
    finally:
        nvml.nvmlShutdown()


def _probe_nvidia_smi() -> list[GpuDevice] | None:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    completed = subprocess.run(
        [binary, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=NVIDIA_SMI_TIMEOUT_S,
        check=False,
    )
    if completed.returncode != 0:
        return None
    return parse_nvidia_smi(completed.stdout)


def parse_nvidia_smi(output: str) -> list[GpuDevice]:
    """Devices from ``--query-gpu=index,name,memory.total --format=csv,noheader,nounits``."""
    devices = []
    for line in output.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            continue
        index, name, memory_mib = fields
        try:
            devices.append(GpuDevice(int(index), name, int(float(memory_mib) * 1024**2)))
        except ValueError:
            continue  # "[N/A]" and the like
    return devices
