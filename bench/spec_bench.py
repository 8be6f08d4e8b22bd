"""Speculative decoding, measured: single-stream tok/s with and without, on work that copies.

    .venv/bin/python bench/spec_bench.py [--rounds N] [--max-tokens N] [--no-llama-server]

Two edge-agent daemons on the default model, one with ``speculative.mode = "ngram"``
and one with it off, and (when bench/build_llama_server.sh has built it) llama.cpp's
``llama-server`` without speculation and with its own n-gram mode (``--spec-type
ngram-simple``). All run at once but only one works at a time: each round sends every
workload to every server in turn, one request at a time, so all see the same machine.
Workloads where the answer copies the prompt (correct a text's spelling, extract fields
from a document) and one where it does not (free writing). Temperature 0, fixed
max_tokens. tok/s is completion tokens over the request's wall time as the client sees
it (median over rounds, after one warm-up round that fills the prompt caches).

Prints a markdown table: tok/s, the ratio with/without, edge-agent's acceptance
(drafted tokens accepted, from its per-request ``speculation`` log lines) and
llama-server's (from its response ``timings``), and whether the texts with and without
speculation are identical (MISMATCH otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from serve_bench import cached_llama_server, gguf_path  # noqa: E402

PARAGRAPH = (
    "The old lighthouse stood on the rocky point for more than a hundred years. Every "
    "night the keeper climbed the narow stairs, lit the great lamp, and watched the ships "
    "pass safely through the dangerus channel. When the storms came in wintre, the waves "
    "crashed against the rocks and the wind howled around the tower, but the light never "
    "faild. The people of the village beleived that as long as the lamp was burning, no "
    "ship would be lost on their coast, and for many years they were right."
)
DOCUMENT = (
    "INVOICE\n"
    "Invoice number: INV-2024-0917\n"
    "Date of issue: 12 March 2024\n"
    "Customer: Northwind Traders Ltd, 42 Harbour Road, Bristol BS1 4DJ, United Kingdom\n"
    "Contact: Maria Lopez, purchasing manager (maria.lopez@northwind.example)\n"
    "Items: 12 x galvanised steel brackets at 4.50 GBP each; 3 x heavy hinge sets at "
    "18.00 GBP each\n"
    "Total due: 108.00 GBP\n"
    "Payment terms: 30 days from the date of issue, by bank transfer to account "
    "GB29 NWBK 6016 1331 9268 19\n"
)
WORKLOADS = {
    "correct": "Correct the spelling mistakes in this text. Write out the whole corrected "
    "text and nothing else.\n\n" + PARAGRAPH,
    "extract": "Extract these fields from the document, one per line as 'field: value': "
    "invoice number, date of issue, customer, contact, items, total due, payment terms."
    "\n\n" + DOCUMENT,
    "free writing": "Write a short story about a robot who learns to paint.",
}
COPYING = ("correct", "extract")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    base: str
    ready_path: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    log_offset: int = 0

    def start(self) -> None:
        handle = tempfile.NamedTemporaryFile(prefix=f"spec-bench-{self.name}-", delete=False)
        self.log_path = Path(handle.name)
        command = [c.replace("{port}", str(self.port)) for c in self.command]
        self.process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            try:
                url = f"http://127.0.0.1:{self.port}{self.ready_path}"
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not ready; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def chat(self, prompt: str, max_tokens: int) -> tuple[str, int, float, dict[str, Any]]:
        """(text, completion tokens, wall seconds, the response) of one request."""
        body = {
            "model": "bench",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{self.base}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        seconds = time.perf_counter() - started
        text = answer["choices"][0]["message"]["content"] or ""
        return text, int(answer["usage"]["completion_tokens"]), seconds, answer

    def new_log_events(self, event: str) -> list[dict[str, Any]]:
        """JSON log lines named ``event`` written since the last call."""
        assert self.log_path is not None
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset)
            data = log.read()
        self.log_offset += len(data)
        found = []
        for line in data.splitlines():
            if event.encode() not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                found.append(record)
        return found


@dataclass
class Tally:
    rates: list[float] = field(default_factory=list)
    texts: set[str] = field(default_factory=set)
    tokens: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0


def edge_agent(name: str, mode: str, state: Path) -> Server:
    return Server(
        name=name,
        command=[
            sys.executable,
            *"-m edge_agent.cli serve --host 127.0.0.1 --port {port} --state-dir".split(),
            str(state / name),
        ],
        env={
            "EDGE_AGENT_SPECULATIVE__MODE": mode,
            "EDGE_AGENT_LOG_FORMAT": "json",
            "PYTHONPATH": str(REPO),
        },
        base="/infer/openai/v1",
        ready_path="/readyz",
    )


def llama_server(name: str, binary: Path, threads: int, spec: list[str]) -> Server:
    return Server(
        name=name,
        command=[
            str(binary),
            "--model",
            str(gguf_path()),
            *f"--threads {threads} --parallel 1 --ctx-size 4096".split(),
            *"--port {port} --host 127.0.0.1 --no-webui".split(),
            *spec,
        ],
        env={},
        base="/v1",
        ready_path="/health",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--no-llama-server", action="store_true")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    state = Path(tempfile.mkdtemp(prefix="spec-bench-"))
    servers = [edge_agent("edge-agent off", "off", state)]
    servers.append(edge_agent("edge-agent ngram", "ngram", state))
    binary = None if args.no_llama_server else cached_llama_server()
    if binary is not None:
        servers.append(llama_server("llama-server", binary, threads, []))
        servers.append(
            llama_server(
                "llama-server ngram",
                binary,
                threads,
                # Its n-gram lookup, sized as edge-agent's: 3-token matches, 8-token drafts.
                "--spec-type ngram-simple --spec-ngram-simple-size-n 3 "
                "--spec-ngram-simple-size-m 8".split(),
            )
        )
    tallies: dict[tuple[str, str], Tally] = {}
    load_before = os.getloadavg()
    try:
        for server in servers:  # one at a time: edge-agent times its verify costs at start
            server.start()
            print(f"started {server.name}", flush=True)
        for round_ in range(args.rounds + 1):
            for w, (workload, prompt) in enumerate(WORKLOADS.items()):
                # Rotate who goes first, so no server always follows the same one.
                first = (round_ + w) % len(servers)
                order = servers[first:] + servers[:first]
                for server in order:
                    text, tokens, seconds, answer = server.chat(prompt, args.max_tokens)
                    events = server.new_log_events("speculation")
                    if round_ == 0:
                        continue  # the warm-up: prompt caches filled, pages touched
                    tally = tallies.setdefault((server.name, workload), Tally())
                    tally.rates.append(tokens / seconds)
                    tally.texts.add(text)
                    tally.tokens.append(tokens)
                    tally.drafted += sum(int(e["drafted"]) for e in events)
                    tally.accepted += sum(int(e["accepted"]) for e in events)
                    timings = answer.get("timings") or {}
                    tally.drafted += int(timings.get("draft_n") or 0)
                    tally.accepted += int(timings.get("draft_n_accepted") or 0)
            if round_:
                print(f"round {round_} done", flush=True)
    finally:
        for server in servers:
            server.stop()
    load_after = os.getloadavg()
    report(tallies, servers, args, threads, load_before, load_after)
    return 0


def report(
    tallies: dict[tuple[str, str], Tally],
    servers: list[Server],
    args: argparse.Namespace,
    threads: int,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> None:
    print()
    print(
        f"{args.rounds} rounds, max_tokens {args.max_tokens}, temperature 0, {threads} threads; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    pairs = [("edge-agent off", "edge-agent ngram")]
    if any(s.name == "llama-server" for s in servers):
        pairs.append(("llama-server", "llama-server ngram"))
    print()
    print("| server | workload | tokens | tok/s without | tok/s with | ratio | acceptance | text |")
    print("|---|---|---|---|---|---|---|---|")
    for off, on in pairs:
        for workload in WORKLOADS:
            plain, spec = tallies[(off, workload)], tallies[(on, workload)]
            rate_off = statistics.median(plain.rates)
            rate_on = statistics.median(spec.rates)
            acceptance = f"{spec.accepted}/{spec.drafted}" + (
                f" ({spec.accepted / spec.drafted:.0%})" if spec.drafted else ""
            )
            same = plain.texts == spec.texts and len(plain.texts) == 1
            print(
                f"| {off.split()[0]} | {workload} | {statistics.median(spec.tokens):.0f} | "
                f"{rate_off:.1f} | {rate_on:.1f} | {rate_on / rate_off:.2f} | {acceptance} | "
                f"{'identical' if same else 'MISMATCH'} |"
            )
    if len(pairs) > 1:
        print()
        for workload in WORKLOADS:
            ours = tallies[("edge-agent ngram", workload)]
            theirs = tallies[("llama-server ngram", workload)]
            print(
                f"{workload}: edge-agent ngram / llama-server ngram = "
                f"{statistics.median(ours.rates) / statistics.median(theirs.rates):.2f}; "
                f"same text: {ours.texts == theirs.texts}"
            )
    copy_ratios = [
        statistics.median(tallies[("edge-agent ngram", w)].rates)
        / statistics.median(tallies[("edge-agent off", w)].rates)
        for w in COPYING
    ]
    held = min(copy_ratios) >= 1.5
    print()
    print(
        f"target: copy-heavy single stream >= 1.5 x without speculation, identical text: "
        f"{'held' if held else 'NOT held'} (ratios {', '.join(f'{r:.2f}' for r in copy_ratios)})"
    )


if __name__ == "__main__":
    sys.exit(main())
