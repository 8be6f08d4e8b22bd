"""The gap a model swap leaves in the token streams of a loaded box.

    .venv/bin/python bench/swap_bench.py [--streams 8] [--seconds 30] [--model MANIFEST]

Starts ``edge-agent serve`` with as many slots as streams and keeps that many streaming
completions running back to back (temperature 0, end-of-text suppressed, a fixed token
count each). Two phases of the same length, in one run: one with no swap, and one
where, halfway, ``PUT /models/active`` swaps to a second model (the default model
requantized to Q4_0 with llama.cpp's quantize API, or ``--model``), and later back.
For each phase it prints the longest gap between two tokens of any stream, its p99 and
median, the longest time to first token, the aggregate tokens/s in the second before,
during and after the swap, and any non-200 answer. Writes bench/out/swap_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_agent.manifest import load_manifest  # noqa: E402
from tests.second_model import make_second_model  # noqa: E402

OUT = REPO / "bench" / "out"
NO_END = {"0": -100, "1": -100, "2": -100}


@dataclass
class Phase:
    name: str
    gaps: list[float] = field(default_factory=list)  # between tokens of one stream
    gap_ends: list[float] = field(default_factory=list)  # when each gap ended
    ttfts: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: int = 0
    swaps: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        gaps = sorted(self.gaps)
        return {
            "phase": self.name,
            "requests": self.requests,
            "tokens": len(self.token_times),
            "max_gap_ms": round(gaps[-1] * 1000, 1) if gaps else None,
            "p99_gap_ms": round(gaps[int(len(gaps) * 0.99)] * 1000, 1) if gaps else None,
            "median_gap_ms": round(statistics.median(gaps) * 1000, 1) if gaps else None,
            "max_ttft_ms": round(max(self.ttfts) * 1000, 1) if self.ttfts else None,
            "errors": self.errors,
            "swaps": self.swaps,
        }


async def stream_loop(
    session: aiohttp.ClientSession, url: str, phase: Phase, stop: float, tokens: int, index: int
) -> None:
    body = {
        "prompt": f"Stream {index}: tell me about the sea.",
        "max_tokens": tokens,
        "temperature": 0,
        "logit_bias": NO_END,
        "stream": True,
    }
    while time.perf_counter() < stop:
        sent = time.perf_counter()
        last: float | None = None
        async with session.post(f"{url}/infer/openai/v1/completions", json=body) as response:
            phase.requests += 1
            if response.status != 200:
                phase.errors.append(f"{response.status}: {(await response.text())[:200]}")
                await asyncio.sleep(0.5)
                continue
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    phase.errors.append(str(chunk["error"])[:200])
                    break
                now = time.perf_counter()
                if last is None:
                    phase.ttfts.append(now - sent)
                else:
                    phase.gaps.append(now - last)
                    phase.gap_ends.append(now)
                last = now
                phase.token_times.append(now)


async def swap(session: aiohttp.ClientSession, url: str, model: str, phase: Phase) -> None:
    started = time.perf_counter()
    async with session.put(f"{url}/models/active", json={"model": model}) as response:
        body = await response.json()
    ended = time.perf_counter()
    phase.swaps.append(
        {
            "model": model,
            "status": response.status,
            "mode": body.get("mode"),
            "started": started,
            "ended": ended,
            "seconds": round(ended - started, 2),
            "detail": body.get("detail") or body.get("error", {}).get("message"),
        }
    )


def rate(times: list[float], start: float, end: float) -> float:
    return sum(start <= t < end for t in times) / (end - start) if end > start else 0.0


async def run_phase(
    url: str, name: str, streams: int, seconds: float, tokens: int, swap_to: list[str]
) -> Phase:
    phase = Phase(name)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        stop = time.perf_counter() + seconds
        loops = [
            asyncio.create_task(stream_loop(session, url, phase, stop, tokens, i))
            for i in range(streams)
        ]
        # Swaps a quarter of the way in and at the half: each with streams on both sides.
        for at, model in zip((0.25, 0.5), swap_to, strict=False):
            await asyncio.sleep(max(0.0, stop - seconds * (1 - at) - time.perf_counter()))
            await swap(session, url, model, phase)
        await asyncio.gather(*loops)
    return phase


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the daemon exited")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the daemon never got ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--model", help="the model to swap to (default: a Q4_0 requantization)")
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--swap-mode", default="auto", choices=["auto", "side_by_side", "drained"])
    args = parser.parse_args()

    default = load_manifest("smollm2-135m-instruct")
    work = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    second = args.model or str(make_second_model(work / "second", default))
    url = f"http://127.0.0.1:{args.port}"
    env = {
        **os.environ,
        "EDGE_AGENT_MODEL_SWAP_ACCESS": "open",
        "EDGE_AGENT_MODEL_SWAP": args.swap_mode,
        "EDGE_AGENT_PARALLEL": str(args.streams),
        "EDGE_AGENT_LOG_FORMAT": "json",
    }
    log = (work / "daemon.log").open("wb")
    command = [sys.executable, "-m", "edge_agent.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(args.port), "--state-dir", str(work / "state")]
    daemon = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, daemon)
        results = []
        for name, targets in (("no swap", []), ("swap and back", [second, default.name])):
            phase = asyncio.run(
                run_phase(url, name, args.streams, args.seconds, args.tokens, targets)
            )
            results.append(phase)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        log.close()

    print(f"\n{args.streams} streams, {args.tokens} tokens per request, {args.seconds:g} s a phase")
    print("| phase | requests | longest gap | p99 gap | median gap | longest ttft | non-200 |")
    print("|---|---|---|---|---|---|---|")
    summaries = []
    for phase in results:
        s = phase.summary()
        summaries.append(s)
        print(
            f"| {s['phase']} | {s['requests']} | {s['max_gap_ms']} ms | {s['p99_gap_ms']} ms "
            f"| {s['median_gap_ms']} ms | {s['max_ttft_ms']} ms | {len(s['errors'])} |"
        )
    swapped = results[1]
    for event in swapped.swaps:
        start, end = event["started"], event["ended"]
        before = rate(swapped.token_times, start - 2, start)
        during = rate(swapped.token_times, start, end)
        after = rate(swapped.token_times, end, end + 2)
        # The longest gap of any stream that ended while this swap ran (or just after).
        inside = [
            gap
            for gap, ended in zip(swapped.gaps, swapped.gap_ends, strict=True)
            if start <= ended <= end + 1.0
        ]
        longest = f"{max(inside) * 1000:.1f} ms" if inside else "no tokens"
        event["longest_gap_ms"] = round(max(inside) * 1000, 1) if inside else None
        print(
            f"swap to {event['model']}: {event['status']} {event['mode']} in "
            f"{event['seconds']} s; longest gap while it ran {longest}; tok/s 2 s before "
            f"{before:.1f}, during {during:.1f}, 2 s after {after:.1f}"
        )
    base, swap_max = summaries[0]["max_gap_ms"], summaries[1]["max_gap_ms"]
    if base and swap_max:
        print(
            f"longest inter-token gap across the swaps: {swap_max} ms, "
            f"{swap_max / base:.2f}x the longest with no swap ({base} ms); "
            f"median step {summaries[0]['median_gap_ms']} ms"
        )
    for s in summaries:
        for error in s["errors"][:5]:
            print(f"  {s['phase']}: {error}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "swap_bench.json").write_text(json.dumps(summaries, indent=2, default=str))
    print(f"daemon log: {work / 'daemon.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
