"""Integrity failures refuse the model; only environmental failures are fallen back from (issue 24, item 9).

A real tiny repository (tiny_onnx.py) served by the real ONNX Runtime CPU backend, with a fallback behind
it that would serve anything (the fake backend standing in for the PyTorch reference from the checkpoint
copy): tampered three ways, the model must be refused — never served by the fallback — with an ERROR
naming the file and the check, `gendr_model_refused`, and the reason in /readyz and /v1/models.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from runtime_helpers import fake_manifest
from tiny_onnx import graph as tiny_graph

from service.backends import select
from service.backends.base import BackendUnavailable
from service.backends.chain import ModelRefused, NoBackendLoaded
from service.backends.fake import FakeBackend
from service.manifest import read_manifest, write_manifest
from service.metrics import Metrics
from service.runtime import ModelRuntime, Runtime
from service.settings import Settings

GRAPH = "onnx/fp32/model.onnx"


def _flip_byte(model: Path, outside: Path) -> None:
    f = model / GRAPH
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _other_graph(model: Path, outside: Path) -> None:
    onnx.save_model(tiny_graph(seed=1), str(model / GRAPH))  # a valid graph, other weights


def _link_out(model: Path, outside: Path) -> None:
    """The same bytes, but outside the model folder: only the path check can catch it."""
    copy = outside / "model.onnx"
    shutil.copy(model / GRAPH, copy)
    (model / GRAPH).unlink()
    os.symlink(copy, model / GRAPH)


TAMPERED: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "one byte flipped": (_flip_byte, "sha256"),
    "another graph copied over it": (_other_graph, "sha256"),
    "a symlink out of the folder": (_link_out, "path"),
}


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_repo / "tiny", tmp_path / "models" / "tiny")
    (tmp_path / "outside").mkdir()
    return tmp_path / "models"


@pytest.fixture
def with_serving_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` gets one more candidate after ONNX Runtime CPU that reads no artifact and serves anything."""
    real = select.candidates

    def candidates(manifest: Any, settings: Settings) -> list[select.Candidate]:
        return [*real(manifest, settings), select.Candidate("fake", "test: a fallback that serves anything")]

    monkeypatch.setattr(select, "candidates", candidates)


@contextlib.contextmanager
def start_app(settings: Settings) -> Iterator[tuple[Any, Runtime]]:
    """create_app over Runtime.from_settings (the real selection); the TestClient once start-up ended."""
    from fastapi.testclient import TestClient

    from service.http.app import create_app

    metrics = Metrics()
    rt = Runtime.from_settings(settings, metrics)
    with TestClient(create_app(settings, runtime=rt, metrics=metrics)) as client:
        end = time.monotonic() + 30
        while client.get("/readyz").json()["status"] == "starting":
            assert time.monotonic() < end, "start-up never ended"
            time.sleep(0.02)
        yield client, rt


def metric(client: Any, name: str) -> list[str]:
    return [line for line in client.get("/metrics").text.splitlines() if line.startswith(name + "{")]


@pytest.mark.usefixtures("with_serving_fallback")
@pytest.mark.parametrize("tamper", list(TAMPERED), ids=list(TAMPERED))
def test_a_tampered_graph_refuses_the_model(
    repo: Path, tmp_path: Path, tamper: str, caplog: pytest.LogCaptureFixture
) -> None:
    edit, check = TAMPERED[tamper]
    edit(repo / "tiny", tmp_path / "outside")
    s = Settings(model_repository=repo, max_queue_delay_ms=2.0)
    assert [c.name for c in select.candidates(read_manifest(repo / "tiny", verify=False), s)][-1] == "fake"
    with caplog.at_level(logging.WARNING):
        with start_app(s) as (client, rt):
            r = client.get("/readyz")
            assert r.status_code == 503 and r.json()["status"] == "failed"
            reason = r.json()["reason"]
            assert f"{GRAPH} failed the {check} check" in reason, reason
            models = client.get("/v1/models")
            assert models.status_code == 503 and f"{GRAPH} failed the {check} check" in models.text
            m = rt.models["tiny"]
            assert m.backend.info.name == "onnxruntime-cpu" and not m.ready  # the fallback never ran
            assert metric(client, "gendr_model_refused") == [
                f'gendr_model_refused{{check="{check}",file="{GRAPH}",model="tiny"}} 1.0'
            ]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("REFUSED" in e and GRAPH in e and f"{check} check" in e for e in errors), errors
    assert not any("falling back" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("with_serving_fallback")
def test_a_graph_whose_io_differs_from_the_manifest_refuses_the_model(repo: Path) -> None:
    """The hashes match, the graph is not the one the manifest describes: refused, not fallen back from."""
    m = read_manifest(repo / "tiny")
    variant = m.onnx["fp32"].model_copy(update={"input_name": "image"})
    write_manifest(repo / "tiny", m.model_copy(update={"onnx": {"fp32": variant}}))
    with start_app(Settings(model_repository=repo)) as (client, _):
        r = client.get("/readyz")
        assert r.status_code == 503 and f"{GRAPH} failed the io check" in r.json()["reason"]
        assert "manifest says image → sr_tile" in r.json()["reason"]


# ----------------------------------------------------------------------- the chain of environmental failures


class _Unavailable(FakeBackend):
    """A backend that cannot run here, for an environmental reason given per class."""

    why = ""
    label = ""

    def load(self) -> None:
        raise BackendUnavailable(self.why)

    @property
    def info(self):  # type: ignore[override]
        import dataclasses

        return dataclasses.replace(super().info, name=self.label)


class _NoGpu(_Unavailable):
    why, label = "no NVIDIA GPU at CUDA index 0", "tensorrt"


class _NoProvider(_Unavailable):
    why, label = "CUDAExecutionProvider could not be initialised", "onnxruntime-cuda"


class _Fp16OnCpu(_Unavailable):
    why, label = "torch backend: fp16 on CPU is not supported", "torch"


def test_every_failure_along_the_chain_is_logged_first_cause_first(caplog: pytest.LogCaptureFixture) -> None:
    """The error that ends the chain starts with the first cause, not the last backend's complaint."""
    import concurrent.futures

    man = fake_manifest()
    host = concurrent.futures.ThreadPoolExecutor(1)
    s = Settings(model_repository=Path("."))
    more = [("ort", lambda: _NoProvider(man)), ("torch", lambda: _Fp16OnCpu(man))]
    m = ModelRuntime("m", Path("."), man, _NoGpu(man), s, Metrics(), host, "auto: tensorrt", fallbacks=more)
    with caplog.at_level(logging.WARNING), pytest.raises(NoBackendLoaded) as err:
        m.load()
    msg = str(err.value)
    order = [msg.index(w) for w in ("no NVIDIA GPU", "CUDAExecutionProvider", "fp16 on CPU")]
    assert order == sorted(order) and msg.startswith("m: no backend could load it: tensorrt failed to load")
    text = caplog.text
    assert text.index("no NVIDIA GPU") < text.index("CUDAExecutionProvider") < text.index("fp16 on CPU")
    assert any(r.levelno == logging.ERROR and "no NVIDIA GPU" in r.getMessage() for r in caplog.records)
    host.shutdown()


def test_an_integrity_failure_after_an_environmental_one_still_refuses(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TensorRT cannot run here (environment) → ONNX Runtime finds a tampered graph → refused, the
    fallback after it is never tried, and the log keeps both causes, the first first."""
    import concurrent.futures

    from service.backends.onnxruntime import OnnxRuntimeBackend

    _flip_byte(repo / "tiny", repo)
    man = read_manifest(repo / "tiny", verify=False)
    served: list[FakeBackend] = []

    def last() -> FakeBackend:
        served.append(FakeBackend(man, repo / "tiny"))
        return served[-1]

    host = concurrent.futures.ThreadPoolExecutor(1)
    s = Settings(model_repository=repo)
    more = [("ort", lambda: OnnxRuntimeBackend(man, repo / "tiny")), ("fake", last)]
    metrics = Metrics()
    m = ModelRuntime("tiny", repo / "tiny", man, _NoGpu(man), s, metrics, host, "auto: trt", fallbacks=more)
    with caplog.at_level(logging.WARNING), pytest.raises(ModelRefused, match=f"{GRAPH} failed the sha256"):
        m.load()
    assert not served and not m.ready
    assert caplog.text.index("no NVIDIA GPU") < caplog.text.index("REFUSED")
    assert metrics.model_refused.labels("tiny", GRAPH, "sha256")._value.get() == 1
    host.shutdown()
