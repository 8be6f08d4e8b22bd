#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the sources vendored in the installed
# llama-cpp-python version, with the same llama.cpp build flags scripts/bootstrap uses,
# so serve_bench.py compares servers, not kernels. Cached per version: prints the path.
#   bench/build_llama_server.sh        # about 5-12 minutes on 2 cores, once
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
version=$("$python" -c 'import llama_cpp; print(llama_cpp.__version__)')
cache="${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent-bench/llama-server-$version"
if [ -x "$cache/llama-server" ]; then echo "$cache/llama-server"; exit 0; fi
# The flags scripts/bootstrap builds llama-cpp-python with (LLAMAFILE off).
flags=$(sed -n 's/^LLAMA_CMAKE_ARGS="\(.*\)"$/\1/p' scripts/bootstrap)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
# shellcheck disable=SC2086  # the flags are words
cmake -S "$work/llama_cpp_python-$version/vendor/llama.cpp" -B "$work/build" \
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF $flags >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$cache"
cp "$work/build/bin/llama-server" "$cache/llama-server"
echo "$cache/llama-server"
