"""llama.cpp in a supervised engine process: a crash in C++ ends requests, never the daemon.

The daemon keeps the tokenizer and talks to one engine process over a Unix socket
(``llamacpp_wire``). When the engine dies (SIGSEGV, an OOM kill, ``kill -9``) or stops
answering while it has work, every request in flight ends at once with
``EngineRestarted``, the backend reports itself unavailable with the reason, and a new
engine starts after a backoff. A configuration that keeps crashing is ruled out and the
next one down the ladder (``llamacpp_config``) takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog

from edge_agent.engine.backends.cpu_priority import raise_to_daemon_priority
from edge_agent.engine.backends.llamacpp import LlamaCppFront
from edge_agent.engine.backends.llamacpp_config import CONFIGS, CpuConfig
from edge_agent.engine.backends.llamacpp_probe import engine_faulted, rule_out, signal_name
from edge_agent.engine.backends.llamacpp_wire import (
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
from edge_agent.engine.types import (
    BackendError,
    EmbeddingRequest,
    EmbeddingResult,
    EngineRestarted,
    EngineUnavailable,
    GenerationRequest,
    UnsupportedFeature,
)
from edge_agent.observability import ENGINE_RESTARTS

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When to start the engine again, and when to give up on a configuration."""

    backoff_s: float = 0.5  # doubled for each crash in the window, up to max_backoff_s
    max_backoff_s: float = 30.0
    crash_window_s: float = 600.0
    crashes_before_fallback: int = 3
    stall_s: float = 120.0  # work waiting and no word from the engine: it is hung


class EngineProcess:
    """One engine child: its process, its socket, and a thread reading what it says."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, start: Start, *, background: bool = False
    ) -> None:
        self._loop = loop
        parent_end, child_end = socket.socketpair()
        command = [sys.executable, "-m", "edge_agent.engine.backends.llamacpp_worker"]
        command += ["serve", "--fd", str(child_end.fileno())]
        if background:
            command.append("--background")
        try:
            self.process = subprocess.Popen(
                command,
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                # The engine's own structlog lines go where the daemon's go (the journal).
                stdout=2,
                stderr=None,
            )
        finally:
            child_end.close()
        self.conn = Connection(parent_end.detach())
        self.pid = self.process.pid
        self.started_at = time.monotonic()
        self.last_heard = time.monotonic()
        self.kill_reason: str | None = None
        self.ready: asyncio.Future[Ready | LoadFailed] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.on_step: Any = None
        self.on_embedded: Any = None
        self.send(start)  # an engine that dies at once is seen by the reader below
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # an unreadable message: the engine is broken
                log.error("engine_message_unreadable", error=str(exc))
                self.process.kill()
                break
            self._loop.call_soon_threadsafe(self._received, message)
        returncode = self.process.wait()
        self._loop.call_soon_threadsafe(self._ended, returncode)

    def _received(self, message: object) -> None:
        self.last_heard = time.monotonic()
        if isinstance(message, Step):
            if self.on_step is not None:
                self.on_step(message)
        elif isinstance(message, Embedded):
            if self.on_embedded is not None:
                self.on_embedded(message)
        elif isinstance(message, Ready | LoadFailed) and not self.ready.done():
            self.ready.set_result(message)

    def _ended(self, returncode: int) -> None:
        self.conn.close()
        if not self.exited.done():
            self.exited.set_result(returncode)

    def send(self, message: object) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError):
            pass  # it died: its exit is on the way and ends the requests it had

    def kill(self, reason: str) -> None:
        self.kill_reason = reason
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def stop(self, timeout_s: float = 15.0) -> None:
        if not self.exited.done():
            self.send(Stop())
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), timeout_s)
            except TimeoutError:
                self.kill("did not stop")
                await self.exited


class LlamaCppProcessBackend(LlamaCppFront):
    """The Backend the daemon serves llama.cpp with: the engine in a supervised child."""

    def __init__(
        self,
        *args: Any,
        policy: RestartPolicy | None = None,
        log_format: str = "json",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._policy = policy or RestartPolicy()
        self._log_format = log_format
        self._engine: EngineProcess | None = None
        self._config: CpuConfig | None = None
        self._unavailable: str | None = "the engine is starting"
        self._crashes: deque[float] = deque()  # the engine's own faults, in the window
        self._deaths: deque[float] = deque()  # every death, in the window: the backoff
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._restarting: asyncio.Task[None] | None = None
        self.restarts = 0
        self.last_restart_s: float | None = None
        self.decode_steps = 0  # the current engine's, as of its last message

    @property
    def unavailable(self) -> str | None:
        return self._unavailable

    def load_in_background(self) -> None:
        """Probe and start the engine at the lowest CPU priority (cpu_priority.py)."""
        self.background = True

    def to_foreground(self) -> str | None:
        """The engine (and any restart of it) at the daemon's priority; why not, if refused."""
        self.background = False
        return raise_to_daemon_priority(self._engine.pid) if self._engine else None

    @property
    def engine_pid(self) -> int | None:
        return self._engine.pid if self._engine else None

    @property
    def config_name(self) -> str | None:
        return self._config.name if self._config else None

    async def start(self) -> None:
        self._config = await self._prepare()
        await self._start_engine(first=True)
        self._supervisor = asyncio.create_task(self._supervise())

    async def _start_engine(self, *, first: bool) -> None:
        """Start engines until one is ready; a crash before ready counts like any other."""
        while True:
            assert self._config is not None
            loop = asyncio.get_running_loop()
            start = Start(self._engine_options(self._config), self._log_format)
            began = time.perf_counter()
            engine = EngineProcess(loop, start, background=self.background)
            engine.on_step = self._on_step
            engine.on_embedded = self._on_embedded
            await asyncio.wait((engine.ready, engine.exited), return_when=asyncio.FIRST_COMPLETED)
            answer = engine.ready.result() if engine.ready.done() else None
            if isinstance(answer, Ready) and not engine.exited.done():
                self._engine = engine
                self._n_ctx_seq = answer.context_length
                self._unavailable = None
                log.info(
                    "engine_ready",
                    pid=engine.pid,
                    config=self._config.name,
                    load_s=round(answer.load_s, 3),
                    self_check_s=round(answer.self_check_s, 3),
                    start_s=round(time.perf_counter() - began, 3),
                    buffers=list(answer.buffers),
                )
                engine.exited.add_done_callback(functools.partial(self._on_exit, engine))
                return
            if isinstance(answer, LoadFailed):
                await engine.stop()
                raise BackendError(answer.message)
            returncode = await engine.exited
            why = signal_name(returncode)
            log.error("engine_died_starting", pid=engine.pid, config=self._config.name, why=why)
            faulted = engine_faulted(returncode, engine.kill_reason)
            if not await self._after_crash(why, faulted=faulted, never_served=first) or (
                self._closing
            ):
                raise BackendError(self._unavailable or f"the engine died starting: {why}")

    def _on_step(self, step: Step) -> None:
        self.decode_steps = step.decode_steps
        for key, item in step.outputs:
            if isinstance(item, SequenceFailed):
                error: BaseException = (
                    UnsupportedFeature(item.feature, item.message)
                    if item.kind == "unsupported"
                    else BackendError(item.message)
                )
                self._deliver(key, error)
            else:
                self._deliver(key, item)

    def _on_embedded(self, message: Embedded) -> None:
        future = self._embeddings.pop(message.key, None)
        if future is None or future.done():
            return  # its request ended (a disconnect) before the vectors came
        result = message.result
        if isinstance(result, SequenceFailed):
            future.set_exception(
                UnsupportedFeature(result.feature, result.message)
                if result.kind == "unsupported"
                else BackendError(result.message)
            )
        else:
            future.set_result(result)

    def _on_exit(self, engine: EngineProcess, _: object = None) -> None:
        if self._closing or engine is not self._engine:
            return
        returncode = engine.exited.result()
        why = engine.kill_reason or signal_name(returncode)
        self._engine = None
        self._unavailable = f"the engine process died ({why}) and is restarting"
        ended = self._fail_all(EngineRestarted(f"the engine process died ({why}); retry shortly"))
        ENGINE_RESTARTS.labels(reason=why.split(":")[0].replace(" ", "_")).inc()
        log.error(
            "engine_died",
            pid=engine.pid,
            config=self.config_name,
            why=why,
            requests_ended=ended,
            served_s=round(time.monotonic() - engine.started_at, 1),
        )
        faulted = engine_faulted(returncode, engine.kill_reason)
        self._restarting = asyncio.get_running_loop().create_task(self._restart(why, faulted))

    async def _restart(self, why: str, faulted: bool) -> None:
        died_at = time.perf_counter()
        if not await self._after_crash(why, faulted=faulted, never_served=False):
            return
        try:
            await self._start_engine(first=False)
        except BackendError as exc:
            self._unavailable = f"the engine cannot start: {exc}"
            log.error("engine_restart_failed", error=str(exc))
            return
        self.restarts += 1
        self.last_restart_s = time.perf_counter() - died_at
        log.info("engine_restarted", restarts=self.restarts, seconds=round(self.last_restart_s, 3))

    async def _after_crash(self, why: str, *, faulted: bool, never_served: bool) -> bool:
        """Count the death, fall back if this configuration keeps faulting, wait the backoff.

        Only a fault of the engine's own (``faulted``: a crash signal, an error exit, a
        hang) speaks against its configuration. A configuration whose first engine
        faults before it is ready has never served on this box (``never_served``): it is
        ruled out at once rather than crash-looped. A kill from outside (an operator's
        ``kill -9``, the OOM killer) says nothing about the configuration: the engine is
        restarted, after the backoff, with the same one. False when nothing is left to try.
        """
        policy = self._policy
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > policy.crash_window_s:
            self._deaths.popleft()
        if faulted:
            self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > policy.crash_window_s:
            self._crashes.popleft()
        assert self._config is not None
        if faulted and (len(self._crashes) >= policy.crashes_before_fallback or never_served):
            verdict = rule_out(
                self._cache,
                ladder=self._ladder,
                gguf_sha256=self._digest,
                threads=self._threads,
                config=self._config.name,
                why=(
                    f"died before it was ready: {why}"
                    if never_served
                    else f"crashed {len(self._crashes)} times in {policy.crash_window_s:g} s: {why}"
                ),
            )
            self.verdict = verdict
            if verdict.config is None:
                self._unavailable = verdict.reason
                log.error("engine_no_configuration_left", reason=verdict.reason)
                return False
            log.warning("engine_fallback", config=verdict.config, reason=verdict.reason)
            self._config = CONFIGS[verdict.config]
            self._crashes.clear()
        # Every death in the window doubles the wait, whatever killed the engine: an OOM
        # kill that comes back with each start must not become a tight restart loop.
        delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** max(0, len(self._deaths) - 1))
        await asyncio.sleep(delay)
        return not self._closing

    async def _supervise(self) -> None:
        """Kill an engine that has work but has said nothing for ``stall_s``."""
        while not self._closing:
            await asyncio.sleep(min(5.0, self._policy.stall_s / 4))
            engine = self._engine
            if engine is None or not (self._inboxes or self._embeddings):
                continue
            silent = time.monotonic() - engine.last_heard
            if silent > self._policy.stall_s:
                log.error("engine_stalled", pid=engine.pid, silent_s=round(silent, 1))
                engine.kill("stalled")

    def _submit(self, key: int, request: GenerationRequest) -> None:
        engine = self._engine
        if engine is None:
            raise EngineUnavailable(self._unavailable or "the engine is not running")
        if not self._inboxes or len(self._inboxes) == 1:
            engine.last_heard = time.monotonic()  # the stall clock starts with the work
        engine.send(Submit(key, request))

    def _cancel(self, key: int) -> None:
        if self._engine is not None:
            self._engine.send(Cancel(key))

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """The vectors from the engine process's embedding context (``llamacpp_embed``)."""
        engine = self._engine
        if engine is None:
            raise EngineUnavailable(self._unavailable or "the engine is not running")
        key = next(self._keys)
        future: asyncio.Future[tuple[tuple[float, ...], ...]] = (
            asyncio.get_running_loop().create_future()
        )
        if not self._inboxes and not self._embeddings:
            engine.last_heard = time.monotonic()  # the stall clock starts with the work
        self._embeddings[key] = future
        engine.send(Embed(key, request))
        try:
            return EmbeddingResult(await future)
        finally:
            self._embeddings.pop(key, None)

    async def close(self) -> None:
        self._closing = True
        for task in (self._supervisor, self._restarting):
            if task is not None:
                task.cancel()
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.stop()
        self._fail_all(BackendError("the engine stopped"))
        await asyncio.to_thread(self._free_front)
