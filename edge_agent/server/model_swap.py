"""A new model on a live box: loaded beside the old one, canaried, then switched to.

The one code path behind ``PUT /models/active``, ``edge-agent models use`` and a SIGHUP
with a new ``model``. The candidate loads in an engine of its own while the old model
serves; it must pass the engine's start-up self-check and the manifest's canary; then
new requests go to it, requests already running end on the old one (each holds its
model, ``AppState.serving``), and the old one is closed once none holds it. A candidate
that fails (weights, load, canary) is closed and the old model never stopped serving.

Where memory does not hold both (``model_swap``, or the estimate in ``engine/memory.py``)
the swap is drained instead: new requests get 503 + Retry-After while the old model
finishes its requests and is closed and the new one loads; if the new one fails, the
old one is loaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import structlog

from edge_agent.engine.backend_choice import BackendFactory
from edge_agent.engine.canary import CanaryResult, run_canary
from edge_agent.engine.memory import available_bytes, model_bytes
from edge_agent.engine.scheduler import Scheduler
from edge_agent.engine.types import LoadsInBackground
from edge_agent.manifest import ManifestError, ModelManifest, sha256_of
from edge_agent.model_store import (
    ModelPin,
    find_model,
    read_pin,
    write_pin,
    write_swap_outcome,
)
from edge_agent.observability import set_model_info
from edge_agent.server.params import served_manifest
from edge_agent.server.state import AppState, Candidate, ServedModel

log = structlog.get_logger(__name__)

SwapMode = Literal["side_by_side", "drained"]
Outcome = Literal["swapped", "unchanged", "failed", "not_found", "busy"]


@dataclass(frozen=True, slots=True)
class SwapResult:
    outcome: Outcome
    model: str  # the model asked for
    detail: str
    mode: SwapMode | None = None
    canary: CanaryResult | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome in ("swapped", "unchanged")


class _Refused(Exception):
    """The candidate failed; the message is the reason, said once."""


class ModelSwitcher:
    """Swaps ``state.active`` for another model, one swap at a time."""

    def __init__(self, state: AppState, factory: BackendFactory) -> None:
        self._state = state
        self._factory = factory
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def switch(self, target: str, *, origin: str) -> SwapResult:
        """Serve ``target`` (a manifest name or path) from now on, or say why not."""
        if self._lock.locked():
            wanted = self._state.candidate.manifest.name if self._state.candidate else "?"
            return SwapResult("busy", target, f"a swap to {wanted} is under way")
        async with self._lock:
            started = time.perf_counter()
            result = await self._switch(target, origin)
            result = SwapResult(
                result.outcome,
                result.model,
                result.detail,
                result.mode,
                result.canary,
                round(time.perf_counter() - started, 3),
            )
        with contextlib.suppress(OSError):
            write_swap_outcome(
                self._state.settings.state_dir, target, result.ok, result.detail, origin
            )
        return result

    async def _switch(self, target: str, origin: str) -> SwapResult:
        state = self._state
        if state.status == "Loading":
            return SwapResult("busy", target, "the current model is still loading")
        try:
            found = await asyncio.to_thread(find_model, target, state.settings.state_dir)
            manifest = served_manifest(found, state.settings.openai_enabled)
        # OSError: a name the filesystem refuses (too long); ValueError: a NUL in it, a
        # manifest that is not UTF-8, or defaults no request could carry.
        except (ManifestError, ValueError, OSError) as exc:
            log.error("model_swap_failed", model=target, origin=origin, reason=str(exc))
            return SwapResult("not_found", target, str(exc))
        current = state.active.manifest
        if (
            state.status == "Running"
            and manifest.name == current.name
            and manifest.sha256 == current.sha256
        ):
            self._pin(target, manifest)
            return SwapResult("unchanged", target, f"{manifest.name} is already serving")
        state.candidate = Candidate(manifest, "Loading", "loading beside the serving model", origin)
        mode = await self._mode(manifest)
        log.info("model_swap_started", model=manifest.name, origin=origin, mode=mode)
        try:
            if mode == "side_by_side" or state.status != "Running":
                canary = await self._side_by_side(manifest)
            else:
                canary = await self._drained(manifest)
        except _Refused as refused:
            reason = str(refused)
            state.candidate = Candidate(manifest, "Error", reason, origin)
            log.error(
                "model_swap_failed", model=manifest.name, origin=origin, mode=mode, reason=reason
            )
            return SwapResult("failed", target, reason, mode)
        state.candidate = None
        self._pin(target, manifest)
        set_model_info(manifest.name, manifest.sha256, manifest.version)
        log.info(
            "model_swapped",
            model=manifest.name,
            version=manifest.version,
            previous=state.previous_model,
            origin=origin,
            mode=mode,
            canary_sha256=canary.sha256,
        )
        return SwapResult(
            "swapped", target, f"{manifest.name} serving ({canary.describe()})", mode, canary
        )

    async def _mode(self, manifest: ModelManifest) -> SwapMode:
        settings = self._state.settings
        if settings.model_swap != "auto":
            return settings.model_swap
        if manifest.gguf is None:
            return "drained"  # a GPU model: two rarely fit in one card's memory
        try:
            need = await asyncio.to_thread(
                model_bytes,
                manifest.gguf_path(),
                context_length=settings.context_size or manifest.context_length,
                slots=settings.parallel,
                kv_cache_type=settings.kv_cache_type,
            )
            room = available_bytes()
        except (OSError, ValueError, KeyError) as exc:
            log.warning("model_swap_memory_unknown", error=str(exc))
            return "drained"
        mode: SwapMode = "side_by_side" if need <= room else "drained"
        log.info("model_swap_memory", need_mib=need >> 20, available_mib=room >> 20, mode=mode)
        return mode

    async def _load(self, manifest: ModelManifest) -> tuple[ServedModel, CanaryResult]:
        """The candidate started and canaried, or _Refused with why (nothing left running)."""
        settings = self._state.settings
        try:
            backend = self._factory(settings, manifest)
        except Exception as exc:
            raise _Refused(f"cannot serve this model here: {exc}") from None
        scheduler = Scheduler(
            backend, max_queue=settings.max_queue, request_timeout_s=settings.request_timeout_s
        )
        served = ServedModel(manifest, backend, scheduler)
        # Beside a serving model, the candidate takes only the cycles it leaves.
        background: LoadsInBackground | None = None
        if self._state.status == "Running" and isinstance(backend, LoadsInBackground):
            background = backend
            background.load_in_background()
        try:
            try:
                await backend.start()
            except Exception as exc:
                raise _Refused(f"model failed to load: {exc}") from None
            if self._state.candidate is not None:
                self._state.candidate = replace(self._state.candidate, reason="running its canary")
            canary_section = manifest.canary
            try:
                canary = await run_canary(
                    scheduler,
                    canary_section.prompt,
                    max_tokens=canary_section.max_tokens,
                    expected_sha256=canary_section.sha256,
                )
            except Exception as exc:
                raise _Refused(f"canary failed: {exc}") from None
            log.info(
                "model_canary",
                model=manifest.name,
                passed=canary.passed,
                sha256=canary.sha256,
                tokens=canary.tokens,
            )
            if not canary.passed:
                raise _Refused(canary.describe())
        except BaseException:
            await backend.close()
            raise
        if background is not None:
            if refused := background.to_foreground():
                log.warning("engine_priority_not_restored", model=manifest.name, reason=refused)
        return served, canary

    async def _side_by_side(self, manifest: ModelManifest) -> CanaryResult:
        state = self._state
        served, canary = await self._load(manifest)
        old = state.active
        state.active = served
        if state.status == "Running":
            state.previous_model = old.manifest.name
            state.retiring.append(old)
            task = asyncio.create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        else:  # the old model never loaded: nothing of it is serving
            await old.backend.close()
            state.status, state.status_detail = "Running", "ready"
        return canary

    async def _drained(self, manifest: ModelManifest) -> CanaryResult:
        state = self._state
        old = state.active
        # Everything that can be checked before the window opens is checked first.
        await self._check_weights(manifest)
        state.swap_pause = f"swapping the model to {manifest.name}"
        try:
            await old.wait_unused()
            await old.backend.close()
            try:
                served, canary = await self._load(manifest)
            except _Refused:
                await self._restore(old.manifest)
                raise
            state.previous_model = old.manifest.name
            state.active = served
            return canary
        finally:
            state.swap_pause = None

    async def _check_weights(self, manifest: ModelManifest) -> None:
        if manifest.gguf is None:
            return
        path = manifest.gguf_path()
        if not path.is_file():
            raise _Refused(f"model file not found: {path}")
        digest = await asyncio.to_thread(sha256_of, path)
        if digest != manifest.gguf.sha256:
            raise _Refused(
                f"{path} has sha256 {digest}, the manifest says {manifest.gguf.sha256} "
                "(a partial copy or other weights)"
            )

    async def _restore(self, manifest: ModelManifest) -> None:
        """After a failed drained swap: the old model again, loaded afresh."""
        state = self._state
        settings = state.settings
        try:
            backend = self._factory(settings, manifest)
            await backend.start()
        except Exception as exc:
            state.status, state.status_detail = "Error", f"model failed to reload: {exc}"
            log.error("model_reload_failed", model=manifest.name, error=str(exc))
            return
        scheduler = Scheduler(
            backend, max_queue=settings.max_queue, request_timeout_s=settings.request_timeout_s
        )
        state.active = ServedModel(manifest, backend, scheduler)

    async def _retire(self, old: ServedModel) -> None:
        """Close a swapped-out model once no request holds it."""
        try:
            await old.wait_unused()
            await old.scheduler.wait_idle()
            await old.backend.close()
            log.info("model_retired", model=old.manifest.name)
        finally:
            if old in self._state.retiring:
                self._state.retiring.remove(old)

    async def close(self) -> None:
        """At shutdown: the models being retired are closed with the rest."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def _pin(self, target: str, manifest: ModelManifest) -> None:
        """Remember the swap, so a restart serves the same model."""
        state = self._state
        settings = state.settings
        chosen = str(manifest.source) if Path(target).suffix == ".toml" else target
        pin = read_pin(settings.state_dir)
        if pin is None and chosen == settings.model:
            return  # nothing to remember: the configured model serves
        try:
            write_pin(settings.state_dir, ModelPin(chosen, settings.model, state.previous_model))
        except OSError as exc:
            log.warning("model_pin_not_written", error=str(exc))
