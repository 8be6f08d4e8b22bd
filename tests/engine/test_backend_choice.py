"""Which backend serves the model, with the GPU probe and the vLLM check replaced."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import Settings
from edge_agent.engine import hardware
from edge_agent.engine.backend_choice import (
    BackendChoice,
    BackendChoiceError,
    build_backend,
    choose_backend,
)
from edge_agent.engine.backends.vllm import VllmBackend
from edge_agent.engine.hardware import GpuDevice, GpuInfo, parse_nvidia_smi, probe_gpu
from edge_agent.manifest import GgufArtifact, HfArtifact, ModelManifest

H100 = GpuInfo((GpuDevice(0, "NVIDIA H100 80GB HBM3", 80 * 1024**3),), source="nvml")
SHA = "0" * 64


def model(*, gguf: bool = True, hf: bool = True) -> ModelManifest:
    return ModelManifest(
        name="m",
        gguf=GgufArtifact(path=Path("m.gguf"), sha256=SHA) if gguf else None,
        hf=HfArtifact(path=Path("m-hf")) if hf else None,
        source=Path("/models/m.toml"),
    )


def choose(backend: str, manifest: ModelManifest, *, gpu: bool, vllm: bool) -> BackendChoice:
    return choose_backend(
        backend,
        manifest,
        gpu_probe=lambda: H100 if gpu else None,
        vllm_importable=lambda: vllm,
    )


# --- auto ----------------------------------------------------------------------------------


def test_auto_picks_vllm_with_a_gpu_vllm_and_an_hf_artifact() -> None:
    choice = choose("auto", model(), gpu=True, vllm=True)
    assert choice.name == "vllm"
    assert "H100" in choice.reason and choice.gpu == H100


def test_auto_stays_on_llamacpp_with_a_gpu_but_no_vllm() -> None:
    choice = choose("auto", model(), gpu=True, vllm=False)
    assert choice.name == "llamacpp"
    assert "vllm is not installed" in choice.reason


def test_auto_stays_on_llamacpp_without_a_gpu() -> None:
    choice = choose("auto", model(), gpu=False, vllm=True)
    assert choice.name == "llamacpp"
    assert "no CUDA GPU visible" in choice.reason


def test_auto_stays_on_llamacpp_for_a_model_without_hf_weights() -> None:
    choice = choose("auto", model(hf=False), gpu=True, vllm=True)
    assert choice.name == "llamacpp"
    assert "no [hf] artifact" in choice.reason


def test_auto_with_only_hf_weights_and_no_gpu_is_an_error() -> None:
    with pytest.raises(BackendChoiceError, match=r"only an \[hf\] artifact.*no CUDA GPU"):
        choose("auto", model(gguf=False), gpu=False, vllm=True)


def test_the_reason_is_one_line() -> None:
    choice = choose("auto", model(hf=False), gpu=False, vllm=False)
    assert "\n" not in choice.reason
    assert choice.reason.count(";") == 2  # all three missing things named


# --- explicit choices ----------------------------------------------------------------------


def test_explicit_vllm_with_everything_in_place_is_vllm() -> None:
    assert choose("vllm", model(), gpu=True, vllm=True).name == "vllm"


def test_explicit_vllm_without_a_gpu_is_an_error_not_a_fallback() -> None:
    with pytest.raises(BackendChoiceError, match="backend vllm cannot start: no CUDA GPU"):
        choose("vllm", model(), gpu=False, vllm=True)


def test_explicit_vllm_without_vllm_installed_is_an_error() -> None:
    with pytest.raises(BackendChoiceError, match="vllm is not installed"):
        choose("vllm", model(), gpu=True, vllm=False)


def test_explicit_vllm_without_hf_weights_is_an_error() -> None:
    with pytest.raises(BackendChoiceError, match="no \\[hf\\] artifact"):
        choose("vllm", model(hf=False), gpu=True, vllm=True)


def test_explicit_llamacpp_is_llamacpp_even_with_a_gpu() -> None:
    probed: list[bool] = []

    def probe() -> GpuInfo:
        probed.append(True)
        return H100

    choice = choose_backend("llamacpp", model(), gpu_probe=probe, vllm_importable=lambda: True)
    assert choice.name == "llamacpp"
    assert probed == []  # no need to look for a GPU


def test_explicit_llamacpp_without_a_gguf_is_an_error() -> None:
    with pytest.raises(BackendChoiceError, match="no \\[gguf\\] artifact"):
        choose("llamacpp", model(gguf=False), gpu=True, vllm=True)


# --- building ------------------------------------------------------------------------------


def test_build_backend_makes_a_vllm_backend_from_settings(tmp_path: Path) -> None:
    settings = Settings(parallel=8, context_size=2048, prefix_cache=False, state_dir=tmp_path)
    backend = build_backend(BackendChoice("vllm", "test"), model(), settings)
    assert isinstance(backend, VllmBackend)
    args = backend.engine_args()
    assert (args["max_num_seqs"], args["max_model_len"]) == (8, 2048)
    assert args["enable_prefix_caching"] is False
    assert args["model"] == "/models/m-hf"


def test_build_backend_makes_a_supervised_llamacpp_backend_from_settings(tmp_path: Path) -> None:
    from edge_agent.engine.backends.llamacpp_process import LlamaCppProcessBackend

    settings = Settings(parallel=2, threads=3, state_dir=tmp_path)
    backend = build_backend(BackendChoice("llamacpp", "test"), model(), settings)
    assert isinstance(backend, LlamaCppProcessBackend)
    info = backend.info
    assert (info.name, info.parallel, info.context_length) == ("llamacpp", 2, 4096)
    assert backend.unavailable == "the engine is starting"


def test_build_backend_runs_llamacpp_in_process_when_isolation_is_off(tmp_path: Path) -> None:
    from edge_agent.engine.backends.llamacpp import LlamaCppBackend
    from edge_agent.engine.backends.llamacpp_process import LlamaCppProcessBackend

    settings = Settings(state_dir=tmp_path, engine={"isolated": False})
    backend = build_backend(BackendChoice("llamacpp", "test"), model(), settings)
    assert isinstance(backend, LlamaCppBackend)
    assert not isinstance(backend, LlamaCppProcessBackend)


# --- the probe -----------------------------------------------------------------------------


def test_nvidia_smi_output_is_parsed() -> None:
    out = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA L4, [N/A]\n"
    assert parse_nvidia_smi(out) == [GpuDevice(0, "NVIDIA H100 80GB HBM3", 81559 * 1024**2)]


def test_the_probe_falls_back_to_nvidia_smi_and_never_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def nvml_broken() -> None:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    def smi_hangs(*args: Any, **kwargs: Any) -> Any:
        raise subprocess.TimeoutExpired("nvidia-smi", 5)

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(hardware, "_probe_nvml", nvml_broken)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(hardware.subprocess, "run", smi_hangs)
    assert probe_gpu() is None

    def smi_ok(*args: Any, **kwargs: Any) -> Any:
        return subprocess.CompletedProcess(args, 0, stdout="0, NVIDIA L4, 23034\n")

    monkeypatch.setattr(hardware.subprocess, "run", smi_ok)
    gpu = probe_gpu()
    assert gpu is not None and gpu.source == "nvidia-smi" and gpu.name == "NVIDIA L4"


def test_hidden_devices_are_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_probe_nvml", lambda: [H100.devices[0]])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert probe_gpu() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert probe_gpu() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert probe_gpu() == H100
