"""Which CPU configuration serves: real probe processes, a real crash, and the ladder's rules."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from edge_agent.engine.backends.llamacpp_config import NO_REPACK, PLAIN, REPACK, CpuConfig, ladder
from edge_agent.engine.backends.llamacpp_probe import (
    ProbeResult,
    Verdict,
    VerdictCache,
    choose_config,
    engine_faulted,
    rule_out,
    run_probe,
    select_config,
)
from edge_agent.engine.backends.llamacpp_wire import FAULT_ENV
from edge_agent.manifest import ModelManifest


def test_the_setting_orders_the_ladder() -> None:
    assert ladder("auto") == (REPACK, NO_REPACK, PLAIN)
    assert ladder("on") == (REPACK,)
    assert ladder("off") == (NO_REPACK, PLAIN)


def test_a_real_probe_decodes_the_same_tokens_in_both_batched_sequences(
    manifest: ModelManifest,
) -> None:
    result = run_probe(manifest.gguf_path(), PLAIN, threads=2, timeout_s=120)
    assert result.outcome == "passed", result
    assert len(result.tokens) == 8
    assert result.buffers, "llama.cpp's buffer lines were captured"


def test_a_probe_that_segfaults_is_reported_as_crashed(
    manifest: ModelManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "segv:no_repack")
    result = run_probe(manifest.gguf_path(), NO_REPACK, threads=2, timeout_s=120)
    assert (result.outcome, result.detail.split(":")[0]) == ("crashed", "SIGSEGV")


def test_a_probe_that_hangs_is_killed_and_reported(manifest: ModelManifest) -> None:
    result = run_probe(manifest.gguf_path(), PLAIN, threads=2, timeout_s=0.01)
    assert result.outcome == "hung"


def passed(config: str, tokens: tuple[int, ...], repacked: int = 0) -> ProbeResult:
    return ProbeResult(config, "passed", tokens=tokens, repacked_tensors=repacked)


def test_repacked_tokens_that_differ_from_the_next_configuration_are_garbage() -> None:
    results = {
        "repack": passed("repack", (1, 2, 3), repacked=30),
        "no_repack": passed("no_repack", (1, 9, 9)),
    }
    verdict = choose_config(ladder("auto"), lambda c: results[c.name])
    assert verdict.config == "no_repack"
    assert verdict.ruled_out["repack"].startswith("garbage")


def test_repacked_tokens_that_agree_keep_the_fast_path() -> None:
    results = {
        "repack": passed("repack", (1, 2, 3), repacked=30),
        "no_repack": passed("no_repack", (1, 2, 3)),
    }
    verdict = choose_config(ladder("auto"), lambda c: results[c.name])
    assert verdict.config == "repack" and "30 tensors repacked" in verdict.reason


def test_nothing_repacked_needs_no_second_probe() -> None:
    asked: list[str] = []

    def prober(config: CpuConfig) -> ProbeResult:
        asked.append(config.name)
        return passed(config.name, (4, 5))

    assert choose_config(ladder("auto"), prober).config == "repack"
    assert asked == ["repack"]


def test_when_nothing_decodes_there_is_no_configuration_and_the_reason_lists_each() -> None:
    verdict = choose_config(ladder("off"), lambda c: ProbeResult(c.name, "crashed", "SIGSEGV"))
    assert verdict.config is None
    assert "no_repack crashed: SIGSEGV" in verdict.reason
    assert "plain crashed: SIGSEGV" in verdict.reason


def test_a_verdict_is_cached_and_a_crashing_configuration_ruled_out(tmp_path: Path) -> None:
    cache = VerdictCache(tmp_path / "probes.json")
    asked: list[str] = []

    def prober(config: CpuConfig) -> ProbeResult:
        asked.append(config.name)
        return passed(config.name, (4, 5))

    def select() -> Verdict:
        return select_config(
            ladder("auto"), gguf=tmp_path / "m.gguf", gguf_sha256="abc", threads=2,
            cache=cache, prober=prober,
        )  # fmt: skip

    first, second = select(), select()
    assert (first.config, second.config, second.cached) == ("repack", "repack", True)
    assert asked == ["repack"], "the second start reads the cache"
    dropped = rule_out(
        cache, ladder=ladder("auto"), gguf_sha256="abc", threads=2, config="repack", why="x"
    )
    assert dropped.config == "no_repack"
    third = select()
    assert third.config == "no_repack" and third.ruled_out == {"repack": "x"}


def test_a_broken_cache_file_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "probes.json"
    path.write_text("{not json")
    assert VerdictCache(path).get("key") is None
    path.write_text(json.dumps(["a list"]))
    assert VerdictCache(path).get("key") is None


@pytest.mark.parametrize(
    ("returncode", "kill_reason", "faulted"),
    [
        (-signal.SIGSEGV, None, True),
        (-signal.SIGILL, None, True),
        (-signal.SIGABRT, None, True),
        (1, None, True),  # an exception in the engine process
        (-signal.SIGKILL, None, False),  # an operator's kill -9, the OOM killer
        (-signal.SIGTERM, None, False),
        (0, None, False),
        (-signal.SIGKILL, "stalled: no step for 120 s", True),  # hung: the daemon killed it
    ],
)
def test_only_the_engines_own_faults_count_against_its_configuration(
    returncode: int, kill_reason: str | None, faulted: bool
) -> None:
    assert engine_faulted(returncode, kill_reason) is faulted
