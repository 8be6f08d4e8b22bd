"""The llama.cpp engine process: ``python -m edge_agent.engine.backends.llamacpp_worker``.

Two modes, both given a file descriptor by the daemon:

- ``serve --fd N``: N is a Unix socket; read ``Start``, load, self-check, answer
  ``Ready``, then decode what is submitted until ``Stop`` or until the daemon goes away.
- ``probe --fd N --gguf PATH --config NAME``: load, self-check, write one JSON object to
  N and exit. A crash or a hang here costs only this process.

Whatever llama.cpp does wrong, it does it here: a SIGSEGV ends this process, and the
daemon, its HTTP port and its inference log live on in the parent.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import llama_cpp
import structlog

from edge_agent.engine.backends.cpu_priority import lower_own_priority
from edge_agent.engine.backends.llamacpp_batch import SequenceState, StepOutput
from edge_agent.engine.backends.llamacpp_config import CONFIGS
from edge_agent.engine.backends.llamacpp_engine import EngineOptions, LlamaCppEngine
from edge_agent.engine.backends.llamacpp_sampling import SamplerChain, grammar_for
from edge_agent.engine.backends.llamacpp_vocab import set_llama_log_callback
from edge_agent.engine.backends.llamacpp_wire import (
    FAULT_ENV,
    Cancel,
    Embed,
    Embedded,
    LoadFailed,
    Ready,
    SequenceFailed,
    Start,
    Step,
    Stop,
    Submit,
)
from edge_agent.engine.types import BackendError, UnsupportedFeature

log = structlog.get_logger(__name__)


class LoadLog:
    """Keeps what llama.cpp says while loading that tells which buffer types serve."""

    def __init__(self) -> None:
        self._partial = ""
        self.buffers: list[str] = []
        self.repacked = 0

    def __call__(self, level: int, text: bytes, user_data: Any) -> None:
        self._partial += text.decode("utf-8", errors="replace")
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if "model buffer size" in line:
                self.buffers.append(line.split(":", 1)[-1].strip())
            # "amx repack tensor ..." (AMX) and "repack: repack tensor ..." (CPU_REPACK).
            if "repack tensor" in line:
                self.repacked += 1


def _inject_fault(config_name: str) -> None:
    """Crash for real, as a broken kernel would, when a test asks for it."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"segv:{config_name}":
        os.kill(os.getpid(), signal.SIGSEGV)


def probe(fd: int, gguf: Path, config_name: str, threads: int) -> int:
    load_log = LoadLog()
    set_llama_log_callback(load_log)
    options = EngineOptions(
        gguf_path=gguf,
        context_length=256,
        parallel=2,
        threads=threads,
        n_batch=128,
        prefix_cache=False,
        config=CONFIGS[config_name],
    )
    engine = LlamaCppEngine(options)
    result: dict[str, Any] = {"config": config_name}
    started = time.perf_counter()
    try:
        engine.load()
        result["load_s"] = time.perf_counter() - started
        _inject_fault(config_name)
        check = engine.self_check(n_tokens=8)
        result.update(asdict(check), passed=check.passed)
    except BackendError as exc:
        result.update(passed=False, error=str(exc))
    result.update(buffers=load_log.buffers, repacked_tensors=load_log.repacked)
    with os.fdopen(fd, "w") as out:
        json.dump(result, out)
    engine.close()
    return 0


class EngineServer:
    """The serve mode: one engine, one socket to the daemon."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._sequences: dict[int, SequenceState] = {}
        self._engine: LlamaCppEngine | None = None
        # Embedding requests wait here for the embedding thread, one at a time, so the
        # socket reader stays free for generation's Submit and Cancel.
        self._embeds: queue.SimpleQueue[Embed | None] = queue.SimpleQueue()

    def send(self, message: object) -> None:
        with self._send_lock:
            self._conn.send(message)

    def run(self) -> int:
        start = self._conn.recv()
        assert isinstance(start, Start)
        _configure_logging(start.log_format)
        load_log = LoadLog()
        set_llama_log_callback(load_log)
        began = time.perf_counter()
        engine = LlamaCppEngine(start.options)
        try:
            engine.load()
        except BackendError as exc:
            self.send(LoadFailed(str(exc)))
            return 1
        load_s = time.perf_counter() - began
        _inject_fault(start.options.config.name)
        self._engine = engine
        check = engine.start(self._deliver)
        if not check.passed:
            self.send(LoadFailed(f"self-check failed: {check}"))
            return 1
        embedding = threading.Thread(target=self._embed_loop, name="llamacpp-embed", daemon=True)
        embedding.start()
        self.send(
            Ready(
                context_length=engine.n_ctx_seq,
                self_check_tokens=check.tokens,
                self_check_s=check.seconds,
                load_s=load_s,
                system_info=llama_cpp.llama_print_system_info().decode(errors="replace"),
                buffers=tuple(load_log.buffers),
            )
        )
        try:
            self._serve()
        except (EOFError, OSError):
            pass  # the daemon went away: nothing is left to serve
        self._embeds.put(None)
        embedding.join(timeout=30)
        engine.close()
        return 0

    def _serve(self) -> None:
        engine = self._engine
        assert engine is not None and engine.loop is not None and engine.vocab is not None
        while True:
            message = self._conn.recv()
            if isinstance(message, Submit):
                params = message.request.params
                try:
                    sampler = SamplerChain(
                        engine.vocab.handle, engine.vocab.n_vocab, params, grammar_for(params)
                    )
                except UnsupportedFeature as exc:
                    failure = SequenceFailed("unsupported", exc.message, exc.feature)
                    self.send(Step([(message.key, failure)]))
                    continue
                sequence = SequenceState(request=message.request, sampler=sampler, key=message.key)
                self._sequences[message.key] = sequence
                engine.loop.submit(sequence)
            elif isinstance(message, Cancel):
                cancelled = self._sequences.pop(message.key, None)
                if cancelled is not None:
                    cancelled.cancelled = True
            elif isinstance(message, Embed):
                self._embeds.put(message)
            elif isinstance(message, Stop):
                return

    def _embed_loop(self) -> None:
        """The embedding thread: each request's vectors, or why there are none."""
        while (message := self._embeds.get()) is not None:
            result: tuple[tuple[float, ...], ...] | SequenceFailed
            try:
                if self._engine is None:
                    raise BackendError("the engine has no embedding context")
                # Computed by the decode thread (see llamacpp_batch); this thread waits,
                # so the socket reader stays free for Submit and Cancel.
                result = tuple(self._engine.embed(message.request.inputs).result())
            except UnsupportedFeature as exc:
                result = SequenceFailed("unsupported", exc.message, exc.feature)
            except Exception as exc:  # one request's failure, not the engine's
                log.error("embedding_failed", error=str(exc))
                result = SequenceFailed("backend", str(exc))
            try:
                self.send(Embedded(message.key, result))
            except OSError:
                return  # the daemon is gone; the main thread ends the process

    def _deliver(self, outputs: StepOutput) -> None:
        """From the decode thread: one message per step, with every sequence's events."""
        loop = self._engine.loop if self._engine else None
        step = Step(decode_steps=loop.steps if loop else 0)
        for sequence, item in outputs:
            if isinstance(item, BaseException):
                step.outputs.append((sequence.key, SequenceFailed("backend", str(item))))
                self._sequences.pop(sequence.key, None)
                continue
            step.outputs.append((sequence.key, item))
            if item and item[-1].finish_reason is not None:
                self._sequences.pop(sequence.key, None)
        try:
            self.send(step)
        except OSError:
            pass  # the daemon is gone; the main thread ends the process


def _configure_logging(log_format: str) -> None:
    from edge_agent.observability import configure_logging

    configure_logging("json" if log_format == "json" else "console")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent-engine")
    sub = parser.add_subparsers(dest="mode", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--fd", type=int, required=True)
    serve.add_argument("--background", action="store_true", help="start at nice 19")
    check = sub.add_parser("probe")
    check.add_argument("--background", action="store_true", help="run at nice 19")
    check.add_argument("--fd", type=int, required=True)
    check.add_argument("--gguf", type=Path, required=True)
    check.add_argument("--config", choices=sorted(CONFIGS), required=True)
    check.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.background:
        lower_own_priority()
    # The daemon stops the engine with Stop or by closing the socket; a Ctrl-C at a
    # terminal reaches the whole process group and must not kill the engine first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.mode == "probe":
        return probe(args.fd, args.gguf, args.config, args.threads)
    return EngineServer(Connection(args.fd)).run()


if __name__ == "__main__":
    sys.exit(main())
