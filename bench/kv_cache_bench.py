"""KV cache element types side by side: memory per slot, decode speed, and greedy text.

For each ``kv_cache_type`` the settings offer, the default model is loaded through the
daemon's own engine (``LlamaCppEngine``) with the same slots and context, and the
self-check decodes a fixed prompt greedily in two sequences of one batch. Printed: the
KV cache's size per slot as llama.cpp reports it, ms per two-sequence decode step, and
whether the greedy tokens equal those of the f16 cache and agree between the two
sequences of a batch (the batch-invariance that temperature-0 determinism rests on).

    .venv/bin/python bench/kv_cache_bench.py            # about 30 s on 2 cores
"""

from __future__ import annotations

import argparse
import os
import re
import typing
from typing import Any

from edge_agent.config import KvCacheType
from edge_agent.engine.backends.llamacpp_config import CONFIGS
from edge_agent.engine.backends.llamacpp_engine import EngineOptions, LlamaCppEngine
from edge_agent.engine.backends.llamacpp_vocab import set_llama_log_callback
from edge_agent.manifest import load_manifest

KV_SIZE = re.compile(
    r"llama_kv_cache: size =\s*([\d.]+) MiB.*K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\)"
)


class KvSizeLog:
    """llama.cpp's own line about the KV cache it allocated."""

    def __init__(self) -> None:
        self.line: tuple[float, str, str] | None = None
        self._partial = ""

    def __call__(self, level: int, text: bytes, user_data: Any) -> None:
        self._partial += text.decode("utf-8", errors="replace")
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if match := KV_SIZE.search(line):
                self.line = (float(match[1]), match[2], match[3])


def measure(kind: str, slots: int, context: int, tokens: int, threads: int) -> dict[str, Any]:
    sizes = KvSizeLog()
    set_llama_log_callback(sizes)
    engine = LlamaCppEngine(
        EngineOptions(
            gguf_path=load_manifest("smollm2-135m-instruct").gguf_path(),
            context_length=context,
            parallel=slots,
            threads=threads,
            n_batch=512,
            prefix_cache=False,
            config=CONFIGS["no_repack"],
            kv_cache_type=kind,
        )
    )
    engine.load()
    try:
        engine.self_check(n_tokens=4)  # warm-up: first-touch page faults are not speed
        check = engine.self_check(n_tokens=tokens)
    finally:
        engine.close()
    if sizes.line is None:
        raise SystemExit(f"{kind}: llama.cpp did not report the KV cache size")
    total, k_type, v_type = sizes.line
    return {
        "type": kind,
        "k": k_type,
        "v": v_type,
        "mib_per_slot": total / slots,
        "ms_per_step": check.seconds * 1000 / tokens,
        "tokens": check.tokens,
        "batch_agrees": check.batch_agrees,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--context", type=int, default=4096, help="tokens per slot")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    kinds = typing.get_args(KvCacheType)
    rows = [measure(k, args.slots, args.context, args.tokens, args.threads) for k in kinds]
    reference = next(r for r in rows if r["type"] == "f16")
    print(
        f"{args.slots} slots x {args.context} tokens, {args.threads} threads, SmolLM2-135M Q4_1\n"
    )
    print(
        "| kv_cache_type | K / V | MiB per slot | vs f16 | ms per 2-sequence step "
        "| greedy = f16 | batch agrees |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        same = r["tokens"] == reference["tokens"]
        print(
            f"| {r['type']} | {r['k']} / {r['v']} | {r['mib_per_slot']:.1f} "
            f"| {r['mib_per_slot'] / reference['mib_per_slot']:.2f} | {r['ms_per_step']:.1f} "
            f"| {'yes' if same else 'no'} | {'yes' if r['batch_agrees'] else 'NO'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
