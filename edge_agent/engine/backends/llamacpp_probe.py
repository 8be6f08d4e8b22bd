"""Which CPU configuration serves on this box: each one proved in a process allowed to crash.

Down the ladder of ``llamacpp_config``, each configuration is loaded and made to decode
in a probe process of its own (``llamacpp_worker probe``). A probe that crashes, hangs,
fails, or whose two batched sequences disagree, rules its configuration out. When the
repacked path really repacks (llama.cpp logged repacked tensors), its tokens must also be
those of the next configuration down, or it counts as giving garbage.

The verdict is cached per build, CPU, model and ladder, so a restart pays the probes once;
a configuration that later keeps crashing while serving is marked in the same cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import structlog

from edge_agent.engine.backends.llamacpp_config import CpuConfig
from edge_agent.engine.backends.llamacpp_engine import agree

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S = 120.0  # plus the time to read the weights, see probe_timeout


@dataclass(frozen=True, slots=True)
class ProbeResult:
    config: str
    outcome: str  # passed, crashed, hung, failed, garbage
    detail: str = ""
    tokens: tuple[int, ...] = ()
    repacked_tensors: int = 0
    buffers: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The configuration to serve with (None: none decoded) and one line saying why."""

    config: str | None
    reason: str
    probes: tuple[ProbeResult, ...] = ()
    cached: bool = False
    ruled_out: dict[str, str] = field(default_factory=dict)


def probe_timeout(gguf: Path) -> float:
    size_gb = gguf.stat().st_size / 1e9 if gguf.exists() else 0.0
    return PROBE_TIMEOUT_S + 30.0 * size_gb


# Signals a process gets for its own fault: a bad memory access, an illegal or
# unsupported instruction (an AMX tile op without the kernel's permission), an abort.
FAULT_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS}
)


def engine_faulted(returncode: int, kill_reason: str | None) -> bool:
    """Whether an engine's end was its own fault, and so evidence against its configuration.

    A fault signal, an error exit, or a hang (the daemon killed it as ``stalled``) is; a
    signal from outside (``kill -9`` by an operator, the OOM killer, SIGTERM) is not.
    """
    if kill_reason is not None:
        return kill_reason.startswith("stalled")
    if returncode < 0:
        return -returncode in FAULT_SIGNALS
    return returncode != 0


def signal_name(returncode: int) -> str:
    """``SIGSEGV`` for a process killed by signal 11, ``exit 3`` for a plain exit."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


def run_probe(
    gguf: Path, config: CpuConfig, *, threads: int, timeout_s: float, background: bool = False
) -> ProbeResult:
    """Load and decode under ``config`` in a child process; whatever happens, report it."""
    read_fd, write_fd = os.pipe()
    started = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "edge_agent.engine.backends.llamacpp_worker",
        "probe",
        "--fd",
        str(write_fd),
        "--gguf",
        str(gguf),
        "--config",
        config.name,
        "--threads",
        str(threads),
        *(["--background"] if background else []),
    ]
    try:
        process = subprocess.Popen(
            command,
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        os.close(read_fd)
        return ProbeResult(config.name, "failed", f"cannot start a probe process: {exc}")
    finally:
        os.close(write_fd)
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        os.close(read_fd)
        return ProbeResult(config.name, "hung", f"no answer within {timeout_s:.0f} s")
    with os.fdopen(read_fd) as answer:
        text = answer.read()
    seconds = time.perf_counter() - started
    if process.returncode != 0 or not text:
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        detail = signal_name(process.returncode) + (f": {tail[0][:200]}" if tail[0] else "")
        outcome = "crashed" if process.returncode < 0 else "failed"
        return ProbeResult(config.name, outcome, detail, seconds=seconds)
    report: dict[str, Any] = json.loads(text)
    if "error" in report:
        outcome, detail = "failed", str(report["error"])
    elif not report.get("passed"):
        outcome = "garbage"
        detail = "non-finite logits" if not report.get("finite") else "batched sequences disagree"
    else:
        outcome, detail = "passed", ""
    return ProbeResult(
        config.name,
        outcome,
        detail,
        tokens=tuple(report.get("tokens", ())),
        repacked_tensors=int(report.get("repacked_tensors", 0)),
        buffers=tuple(report.get("buffers", ())),
        seconds=seconds,
    )


Prober = Callable[[CpuConfig], ProbeResult]


def choose_config(ladder: Sequence[CpuConfig], prober: Prober) -> Verdict:
    """The fastest configuration of ``ladder`` that decodes right on this box."""
    probes: list[ProbeResult] = []
    ruled_out: dict[str, str] = {}
    known: dict[str, ProbeResult] = {}

    def probe(config: CpuConfig) -> ProbeResult:
        if config.name not in known:
            known[config.name] = prober(config)
            probes.append(known[config.name])
        return known[config.name]

    for index, config in enumerate(ladder):
        result = probe(config)
        if not result.passed:
            ruled_out[config.name] = f"{result.outcome}: {result.detail}".rstrip(": ")
            continue
        if result.repacked_tensors and index + 1 < len(ladder):
            reference = probe(ladder[index + 1])
            if reference.passed and not agree(result.tokens, reference.tokens):
                ruled_out[config.name] = (
                    f"garbage: tokens {list(result.tokens)} where {reference.config} "
                    f"gives {list(reference.tokens)}"
                )
                continue
        reason = _reason(config, result, ruled_out)
        return Verdict(config.name, reason, tuple(probes), ruled_out=ruled_out)
    summary = "; ".join(f"{name} {why}" for name, why in ruled_out.items())
    reason = f"no CPU configuration decodes on this box: {summary}"
    return Verdict(None, reason, tuple(probes), ruled_out=ruled_out)


def _reason(config: CpuConfig, result: ProbeResult, ruled_out: dict[str, str]) -> str:
    if config.name == "repack":
        what = (
            f"{result.repacked_tensors} tensors repacked ({', '.join(result.buffers)})"
            if result.repacked_tensors
            else "nothing to repack for this model on this CPU"
        )
    else:
        what = config.description
    why = "; ".join(f"{name} {reason}" for name, reason in ruled_out.items())
    return f"{config.name}: decoded on this box, {what}" + (f"; ruled out: {why}" if why else "")


def fingerprint(gguf_sha256: str, ladder: Sequence[CpuConfig], threads: int) -> str:
    """What a verdict holds for: this llama.cpp build, this CPU, these weights, this ladder."""
    parts = [
        llama_cpp.__version__,
        _build_identity(),
        llama_cpp.llama_print_system_info().decode(errors="replace"),
        _cpu_identity(),
        gguf_sha256,
        ",".join(c.name for c in ladder),
        str(threads),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _build_identity() -> str:
    """The compiled libraries' sizes and times: a rebuild of one version is another build."""
    lib = Path(llama_cpp.__file__).parent / "lib"
    try:
        files = sorted(p for p in lib.iterdir() if p.is_file())
        return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    except OSError:
        return ""


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


class VerdictCache:
    """Verdicts in one JSON file; a broken or unwritable file is only a cache miss."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Verdict | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict) or "config" not in entry:
            return None
        return Verdict(
            entry["config"],
            str(entry.get("reason", "")),
            cached=True,
            ruled_out=dict(entry.get("ruled_out", {})),
        )

    def put(self, key: str, verdict: Verdict) -> None:
        if self.path is None:
            return
        data = self._read()
        data[key] = {
            "config": verdict.config,
            "reason": verdict.reason,
            "ruled_out": verdict.ruled_out,
            "probes": [asdict(p) for p in verdict.probes],
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(data, indent=1))
            temporary.replace(self.path)
        except OSError as exc:
            log.warning("engine_probe_cache_unwritable", path=str(self.path), error=str(exc))


def select_config(
    ladder: Sequence[CpuConfig],
    *,
    gguf: Path,
    gguf_sha256: str,
    threads: int,
    cache: VerdictCache,
    prober: Prober | None = None,
    background: bool = False,
) -> Verdict:
    """The cached verdict for this box, or the probes' (then cached); ``background``
    probes at the lowest CPU priority (a model loading beside a serving one)."""
    key = fingerprint(gguf_sha256, ladder, threads)
    cached = cache.get(key)
    if cached is not None:
        return cached
    timeout = probe_timeout(gguf)
    run = prober or (
        lambda c: run_probe(gguf, c, threads=threads, timeout_s=timeout, background=background)
    )
    verdict = choose_config(ladder, run)
    if verdict.config is not None:
        cache.put(key, verdict)
    return verdict


def rule_out(
    cache: VerdictCache,
    *,
    ladder: Sequence[CpuConfig],
    gguf_sha256: str,
    threads: int,
    config: str,
    why: str,
) -> Verdict:
    """Record that ``config`` failed while serving; the verdict moves one rung down."""
    key = fingerprint(gguf_sha256, ladder, threads)
    names = [c.name for c in ladder]
    ruled_out = dict((cache.get(key) or Verdict(None, "")).ruled_out)
    ruled_out[config] = why
    remaining = [n for n in names if n not in ruled_out]
    if not remaining:
        return Verdict(None, f"every CPU configuration failed: {ruled_out}", ruled_out=ruled_out)
    chosen = remaining[0]
    verdict = Verdict(chosen, f"{chosen}: {config} {why}", ruled_out=ruled_out)
    cache.put(key, verdict)
    return verdict
