"""Embeddings per second: edge-agent's /embeddings for 1, 16 and 256 short inputs a request.

    .venv/bin/python bench/embed_bench.py [--seconds 3]

Starts ``edge-agent serve`` with the default model (logging on, as it serves), sends
requests of 1, 16 and 256 short inputs one after another for about ``--seconds`` each,
and prints embeddings/s and the time per request. Then, with the daemon stopped (never
both at once), the same 256 inputs through the embedding context in this process (no
HTTP, no engine process): once batched as the daemon batches, once one input per
``llama_decode``, which shows what batching buys on this machine. Last, when
bench/build_llama_server.sh has built it, llama.cpp's own ``llama-server --embeddings``
(mean pooling, the same threads and model) gets the same requests at ``/v1/embeddings``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# A sibling script: run as bench/embed_bench.py, its folder is on the path.
from serve_bench import cached_llama_server

REPO = Path(__file__).resolve().parent.parent

SIZES = (1, 16, 256)
PATH = "/infer/openai/v1/embeddings"


def short_inputs(n: int) -> list[str]:
    """Short, distinct sentences of 8 to 12 tokens, like the chunks of a small RAG index."""
    return [
        f"Sensor {i} on line {i % 7} reported a reading of {i * 3 % 101} units." for i in range(n)
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        answer: dict[str, object] = json.load(response)
        return answer


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the daemon exited while starting")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise SystemExit("the daemon did not become ready")


def measure(call: object, n: int, seconds: float) -> tuple[float, float, int]:
    """(embeddings/s, median seconds per call, calls) of ``call`` repeated for ``seconds``."""
    assert callable(call)
    durations: list[float] = []
    began = time.perf_counter()
    while not durations or time.perf_counter() - began < seconds:
        started = time.perf_counter()
        call()
        durations.append(time.perf_counter() - started)
    total = sum(durations)
    return n * len(durations) / total, statistics.median(durations), len(durations)


def bench_daemon(seconds: float) -> list[tuple[str, int, float, float, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as state:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "edge_agent.cli", "serve", "--host", "127.0.0.1"),
                *("--port", str(port), "--state-dir", state),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
            env={**os.environ, "EDGE_AGENT_LOG_FORMAT": "json"},
        )
        try:
            wait_ready(url, process)
            post(url + PATH, {"input": "warm up: the embedding context is made on first use"})
            rows = []
            for n in SIZES:
                body = {"input": short_inputs(n), "encoding_format": "float"}
                rate, median, calls = measure(lambda b=body: post(url + PATH, b), n, seconds)
                rows.append(("edge-agent HTTP", n, rate, median, calls))
            return rows
        finally:
            process.terminate()
            process.wait(timeout=30)


def bench_llama_server(binary: Path, seconds: float) -> list[tuple[str, int, float, float, int]]:
    from edge_agent.manifest import load_manifest

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gguf = load_manifest("smollm2-135m-instruct").gguf_path()
    process = subprocess.Popen(
        [
            *(str(binary), "--model", str(gguf), "--embeddings", "--pooling", "mean"),
            *("--threads", str(os.cpu_count() or 1), "--ctx-size", "8192", "--parallel", "16"),
            *("--batch-size", "512", "--ubatch-size", "512", "--port", str(port)),
            *("--host", "127.0.0.1", "--no-webui"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("llama-server did not become ready") from None
            time.sleep(0.1)
        post(url + "/v1/embeddings", {"input": "warm up"})
        rows = []
        for n in SIZES:
            body = {"input": short_inputs(n), "encoding_format": "float"}
            rate, median, calls = measure(
                lambda b=body: post(url + "/v1/embeddings", b), n, seconds
            )
            rows.append(("llama-server HTTP", n, rate, median, calls))
        return rows
    finally:
        process.terminate()
        process.wait(timeout=30)


def bench_in_process(seconds: float, batch_inputs: int) -> tuple[float, float, int]:
    import llama_cpp

    from edge_agent.engine.backends.llamacpp_embed import Embedder
    from edge_agent.engine.backends.llamacpp_vocab import Vocabulary, quiet_llama_logs
    from edge_agent.manifest import load_manifest

    quiet_llama_logs()
    llama_cpp.llama_backend_init()
    path = load_manifest("smollm2-135m-instruct").gguf_path()
    model = llama_cpp.llama_model_load_from_file(
        str(path).encode(), llama_cpp.llama_model_default_params()
    )
    vocab = Vocabulary(model)
    embedder = Embedder(
        model,
        n_vocab=vocab.n_vocab,
        max_tokens=512,
        max_sequences=batch_inputs,
        threads=os.cpu_count() or 1,
    )
    inputs = [
        vocab.tokenize(text, add_special=True, parse_special=False) for text in short_inputs(256)
    ]
    try:
        embedder.embed(inputs[:1])  # the context is made on first use
        return measure(lambda: embedder.embed(inputs), len(inputs), seconds)
    finally:
        embedder.close()
        llama_cpp.llama_model_free(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument(
        "--llama-server",
        type=Path,
        default=cached_llama_server(),
        help="llama.cpp's llama-server binary (default: bench/build_llama_server.sh's)",
    )
    args = parser.parse_args()
    rows = bench_daemon(args.seconds)
    for batch_inputs, name in ((16, "in-process, 16 a batch"), (1, "in-process, 1 a batch")):
        rate, median, calls = bench_in_process(args.seconds, batch_inputs)
        rows.append((name, 256, rate, median, calls))
    if args.llama_server is not None:
        rows += bench_llama_server(args.llama_server, args.seconds)
    print(f"{os.cpu_count()} cores, SmolLM2-135M-Instruct Q4_1, short inputs (8-12 tokens)\n")
    print("| path | inputs a request | embeddings/s | ms a request (median) | requests |")
    print("|---|---|---|---|---|")
    for name, n, rate, median, calls in rows:
        print(f"| {name} | {n} | {rate:.1f} | {median * 1000:.1f} | {calls} |")
    if args.llama_server is None:
        print("\nllama-server: not built, left out (bench/build_llama_server.sh builds it)")


if __name__ == "__main__":
    main()
