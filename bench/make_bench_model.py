"""Make a 1B-class benchmark GGUF here: a real architecture's shape, seeded random weights.

No registry ships weights of the size edge boxes run, and none may be fetched from a hub,
so the speed of a 1-8B model is measured on one made here. It has the exact tensor
shapes of a real model (TinyLlama-1.1B, or Llama-3.2-3B), the default model's tokenizer
and chat template copied over, and weights drawn from a seeded normal distribution. The
f16 file is quantized to Q4_0 and Q4_K_M with llama.cpp's own quantize API
(``llama_model_quantize``), and a manifest is written beside each, so
``edge-agent serve --model <manifest>`` serves it.

Its text is noise: a benchmark fixes the token count (end-of-text suppressed). It tells
speed (the same matrix sizes, memory traffic and KV cache as the real model, apart from
the vocabulary: 49,152 tokens, TinyLlama has 32,000), not quality or speculative
acceptance rates.

    .venv/bin/python bench/make_bench_model.py                 # tinyllama-1.1b: ~3 minutes
    .venv/bin/python bench/make_bench_model.py --shape llama-3.2-3b

Files are cached in ``$XDG_CACHE_HOME/edge-agent-bench`` (default ``~/.cache``); a second
run with the same shape and seed reuses them. The sha256 of each is printed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from edge_agent.manifest import load_manifest, sha256_of


@dataclass(frozen=True)
class Shape:
    layers: int
    width: int
    heads: int
    kv_heads: int
    ffn: int
    rope_base: float
    context: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


SHAPES = {
    # TinyLlama-1.1B-Chat-v1.0's config.json.
    "tinyllama-1.1b": Shape(22, 2048, 32, 4, 5632, 10000.0, 2048),
    # Llama-3.2-3B's config.json (tied embeddings in the original; an output matrix here).
    "llama-3.2-3b": Shape(28, 3072, 24, 8, 8192, 500000.0, 4096),
}
QUANTS = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-agent-bench"


def tokenizer_fields(source: Path) -> list[tuple[str, object, gguf.GGUFValueType, object]]:
    """The default model's tokenizer and chat template, as typed GGUF key-values."""
    reader = gguf.GGUFReader(source)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), vtype, sub))
    return fields


def write_f16(path: Path, shape: Shape, seed: int, tokenizer: Path) -> int:
    """The model at f16, every weight ~ N(0, 0.02) from ``seed``; returns the vocab size."""
    fields = tokenizer_fields(tokenizer)
    n_vocab = len(next(value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens"))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"edge-agent benchmark model ({path.stem}, random weights)")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.width)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value, vtype, sub in fields:
        writer.add_key_value(key, value, vtype, sub)

    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(shape.width, dtype=np.float32)

    kv = shape.kv_heads * shape.head_dim
    writer.add_tensor("token_embd.weight", weight(n_vocab, shape.width))
    for i in range(shape.layers):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", norm())
        writer.add_tensor(f"{block}.attn_q.weight", weight(shape.width, shape.width))
        writer.add_tensor(f"{block}.attn_k.weight", weight(kv, shape.width))
        writer.add_tensor(f"{block}.attn_v.weight", weight(kv, shape.width))
        writer.add_tensor(f"{block}.attn_output.weight", weight(shape.width, shape.width))
        writer.add_tensor(f"{block}.ffn_norm.weight", norm())
        writer.add_tensor(f"{block}.ffn_gate.weight", weight(shape.ffn, shape.width))
        writer.add_tensor(f"{block}.ffn_up.weight", weight(shape.ffn, shape.width))
        writer.add_tensor(f"{block}.ffn_down.weight", weight(shape.width, shape.ffn))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(n_vocab, shape.width))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return n_vocab


def quantize(source: Path, target: Path, ftype: int, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0:
        raise SystemExit(f"llama_model_quantize returned {status} for {target.name}")


def write_manifest(gguf_file: Path, name: str, sha256: str, context: int) -> Path:
    manifest = gguf_file.with_suffix(".toml")
    manifest.write_text(
        f"# A benchmark model made by bench/make_bench_model.py: random weights, noise text.\n"
        f'name = "{name}"\ncontext_length = {context}\n\n'
        f'[gguf]\npath = "{gguf_file.name}"\nsha256 = "{sha256}"\n'
    )
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--layers", type=int, help="fewer layers than the shape: a quick try")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", type=Path, default=cache_dir())
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    if args.layers:
        shape = Shape(**{**shape.__dict__, "layers": args.layers})
    stem = f"{args.shape}-seed{args.seed}" + (f"-{args.layers}l" if args.layers else "")
    args.dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_manifest("smollm2-135m-instruct").gguf_path()
    f16 = args.dir / f"{stem}-F16.gguf"
    if not f16.is_file():
        started = time.perf_counter()
        partial = f16.with_suffix(".partial")
        n_vocab = write_f16(partial, shape, args.seed, tokenizer)
        partial.rename(f16)
        print(f"wrote {f16.name}: vocab {n_vocab}, {time.perf_counter() - started:.0f} s")
    for quant, ftype in QUANTS.items():
        target = args.dir / f"{stem}-{quant}.gguf"
        if not target.is_file():
            started = time.perf_counter()
            partial = target.with_suffix(".partial")
            quantize(f16, partial, ftype, args.threads)
            partial.rename(target)
            print(f"quantized {target.name} in {time.perf_counter() - started:.0f} s")
        digest = sha256_of(target)
        manifest = write_manifest(target, f"bench-{stem}-{quant}".lower(), digest, shape.context)
        size = target.stat().st_size / 2**20
        print(f"{target}  {size:.0f} MiB  sha256 {digest}\n  manifest: {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
