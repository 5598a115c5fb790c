"""A GPU that was expected but not used is loud (issue 24, item 6).

Doubles: a GPU the selection sees (select.gpu_info) and an onnxruntime whose CUDA provider is compiled in
but cannot load its libraries — as the real one does then, the session silently runs on the CPU
provider alone. Under `auto` the model falls back to ONNX Runtime CPU with an ERROR, the
`gendr_backend_fallback` metric, and the reason in /readyz and /v1/models; with GENDR_BACKEND naming the
GPU backend, start-up fails and /readyz says why.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import onnxruntime
import pytest
from test_runtime_integrity import metric, start_app

from service.backends import select
from service.hardware import GpuInfo
from service.settings import Settings

H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 80 << 30, "0000:17:00.0")


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_repo / "tiny", tmp_path / "tiny")
    return tmp_path


@pytest.fixture
def gpu_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select, "gpu_info", lambda index=0: H100 if index == 0 else None)
    monkeypatch.setattr(select, "tensorrt_version", lambda: None)


def break_cuda_provider(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """CUDAExecutionProvider compiled in, its libraries missing: sessions get the CPU provider only."""
    real = onnxruntime.InferenceSession
    logged: list[str] = []

    def session(path: str, sess_options: Any = None, providers: Any = None, **kw: Any) -> Any:
        names = [p if isinstance(p, str) else p[0] for p in providers or []]
        if "CUDAExecutionProvider" in names:
            logged.append("Failed to load library libonnxruntime_providers_cuda.so: libcudnn.so.9: not found")
        return real(path, sess_options, providers=["CPUExecutionProvider"], **kw)

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    return logged


@pytest.fixture
def broken_cuda_provider(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return break_cuda_provider(monkeypatch)


@pytest.mark.usefixtures("gpu_present")
@pytest.mark.parametrize("provider", ["fails to load", "not installed"])
def test_auto_with_a_gpu_that_ends_on_the_cpu_is_loud(
    repo: Path, provider: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if provider == "fails to load":
        logged = break_cuda_provider(monkeypatch)
        expected, why = "onnxruntime-cuda", "CUDAExecutionProvider could not be initialised"
    else:  # onnxruntime (CPU) only: the selection itself had to pick the CPU
        logged = []
        expected, why = "gpu", "onnxruntime has no CUDA provider"
    with caplog.at_level(logging.WARNING), start_app(Settings(model_repository=repo)) as (client, rt):
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"]  # degraded, serving
        reason = r.json()["fallbacks"]["tiny"]
        assert "a GPU is visible (NVIDIA H100 80GB HBM3 at cuda:0)" in reason and why in reason, reason
        assert "runs on the CPU (onnxruntime-cpu)" in reason
        (model,) = client.get("/v1/models").json()["data"]
        assert model["backend"] == "onnxruntime-cpu" and model["fallback"] == reason
        assert metric(client, "gendr_backend_fallback") == [
            f'gendr_backend_fallback{{backend="onnxruntime-cpu",expected="{expected}",model="tiny"}} 1.0'
        ]
        assert rt.models["tiny"].ready
    assert bool(logged) == (provider == "fails to load")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("GPU FALLBACK" in e and why in e for e in errors), errors


@pytest.mark.usefixtures("gpu_present", "broken_cuda_provider")
def test_a_named_gpu_backend_that_cannot_start_fails_start_up(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING),
        start_app(Settings(model_repository=repo, backend="onnxruntime-cuda")) as (client, rt),
    ):
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        reason = r.json()["reason"]
        assert "GENDR_BACKEND=onnxruntime-cuda names a GPU backend" in reason
        assert "CUDAExecutionProvider could not be initialised" in reason
        assert rt.models["tiny"].backend.info.name == "onnxruntime-cuda" and not rt.models["tiny"].ready
        assert not metric(client, "gendr_backend_fallback")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("no fallback to the CPU" in e for e in errors), errors


def test_no_gpu_no_expectation(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU, ONNX Runtime CPU under `auto` is the plan, not a fallback: nothing is raised."""
    monkeypatch.setattr(select, "gpu_info", lambda index=0: None)
    assert select.gpu_expectation(Settings(model_repository=repo)).why == ""
    with start_app(Settings(model_repository=repo)) as (client, _):
        r = client.get("/readyz")
        assert r.status_code == 200 and "fallbacks" not in r.json()
        assert client.get("/v1/models").json()["data"][0]["fallback"] is None
