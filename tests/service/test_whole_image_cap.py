"""The whole-image cap follows the hardware: measured at warm-up (the fake backend's memory model), it
shrinks when memory does, and /v1/models says the cap and why."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from runtime_helpers import write_fake_repo

from service.backends.fake import FakeBackend, FakeBehaviour
from service.backends.memory import MemoryFit, fit_line
from service.metrics import Metrics
from service.runtime import Runtime
from service.scheduling.whole_image import UNMEASURED_CAP, resolve_cap
from service.settings import WHOLE_IMAGE_AUTO, Settings

MB = 2**20


def _describe(tmp_path: Path, available: int, per_pixel: float = 4096.0, **settings: object) -> dict:
    repo = write_fake_repo(tmp_path, name="fake", tile=32, overlap=8, scale=4)
    s = Settings(model_repository=repo, fake_dynamic=True, **settings)  # type: ignore[arg-type]

    def factory(m, d, st):
        be = FakeBackend.from_settings("fake", m, d, st)
        be.behaviour = FakeBehaviour(
            memory_per_pixel=per_pixel, memory_fixed=8 * MB, memory_available=available
        )
        return be, "test"

    async def go() -> dict:
        rt = Runtime.from_settings(s, Metrics(), backend_factory=factory)
        await rt.start()
        try:
            return rt.get(None).describe()
        finally:
            await rt.close()

    return asyncio.run(asyncio.wait_for(go(), 30))


def test_auto_cap_shrinks_when_memory_does(tmp_path: Path) -> None:
    big = _describe(tmp_path / "a", available=16384 * MB)
    small = _describe(tmp_path / "b", available=1024 * MB)
    tiny = _describe(tmp_path / "c", available=8 * MB)
    caps = [d["whole_image_cap"] for d in (big, small, tiny)]
    assert caps[0]["pixels"] > caps[1]["pixels"] > caps[2]["pixels"] == 0
    # 0.5 × 1024 MB − 8 MB fixed, at 4096 B per input pixel (what the model says, fitted from two calls)
    assert caps[1]["pixels"] == (512 - 8) * MB // 4096
    assert caps[1]["bytes_per_pixel"] == 4096 and caps[1]["source"] == "model"
    assert "measured at warm-up" in caps[1]["reason"] and "tiles only" in caps[2]["reason"]
    assert small["shapes"]["whole_image_max_pixels"] == caps[1]["pixels"]  # what the planner uses
    # the largest graph input a request can need (16 MP out at ×4 = 1 MP in): no cap beyond it
    assert caps[0]["pixels"] == 16_777_216 // 16


def test_cap_is_shared_by_instances_and_the_setting_wins(tmp_path: Path) -> None:
    one = _describe(tmp_path / "a", available=1024 * MB)["whole_image_cap"]["pixels"]
    two = _describe(tmp_path / "b", available=1024 * MB, instances_per_device=2)["whole_image_cap"]
    assert two["pixels"] == (256 - 8) * MB // 4096 < one and "÷ 2 instances" in two["reason"]
    share = _describe(tmp_path / "c", available=1024 * MB, whole_image_memory_share=0.25)
    assert share["whole_image_cap"]["pixels"] == two["pixels"]
    fixed = _describe(tmp_path / "d", available=1024 * MB, whole_image_max_pixels=5000)
    assert fixed["whole_image_cap"] == {
        "pixels": 5000,
        "reason": "set: GENDR_WHOLE_IMAGE_MAX_PIXELS=5000 (5,000 px)",
    }
    assert fixed["shapes"]["whole_image_max_pixels"] == 5000


def test_resolve_cap_without_a_measurement_or_a_dynamic_graph() -> None:
    kw = {"share": 0.5, "instances": 1, "tile": 96, "max_pixels": 1 << 20}
    assert resolve_cap(WHOLE_IMAGE_AUTO, dynamic=False, fit=None, **kw).pixels == 0  # type: ignore[arg-type]
    unmeasured = resolve_cap(WHOLE_IMAGE_AUTO, dynamic=True, fit=None, **kw)  # type: ignore[arg-type]
    assert unmeasured.pixels == UNMEASURED_CAP and "did not measure" in unmeasured.reason
    fit = MemoryFit(1000.0, 0.0, 100 * MB, "rss")
    assert resolve_cap(WHOLE_IMAGE_AUTO, dynamic=True, fit=fit, **kw).pixels == 50 * MB // 1000  # type: ignore[arg-type]
    assert fit_line([(100, 1100), (400, 4100)]) == (10.0, 100.0)


_HOST_MEMORY_PROBE = """
import json, numpy as np
from service.backends.memory import HostMemory, measure
MB = 2**20
probe = HostMemory()
grown = probe.peak(lambda: np.ones(64 * MB, np.uint8).sum())
fit = measure(probe, lambda h, w: np.ones(h * w * 64, np.uint8).sum(), [(512, 512), (1024, 1024)])
bpp = fit.bytes_per_pixel if fit else None
print(json.dumps({"available": probe.available(), "grown": grown, "bpp": bpp}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc only")
def test_host_memory_sees_a_large_allocation() -> None:
    """The CPU reader: the peak resident growth of a call that touches 64 MB is about 64 MB. In a fresh
    process: a long test session's heap reuses freed pages, and a reused page is no growth."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _HOST_MEMORY_PROBE], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["available"] > 0
    assert 48 * MB < got["grown"] < 256 * MB
    assert got["bpp"] is not None and 32 < got["bpp"] < 128


def test_onnxruntime_measures_its_whole_image_calls(tmp_path: Path) -> None:
    """The real CPU path: ONNX Runtime's dynamic graph, its resident-set growth at warm-up, the cap."""
    from tiny_onnx import write_bucket_repo

    write_bucket_repo(tmp_path)
    s = Settings(model_repository=tmp_path, backend="onnxruntime-cpu", max_batch=2, intra_op_threads=1)

    async def go() -> dict:
        rt = Runtime.from_settings(s, Metrics())
        await rt.start()
        try:
            return rt.get(None).describe()
        finally:
            await rt.close()

    cap = asyncio.run(asyncio.wait_for(go(), 120))["whole_image_cap"]
    assert cap["pixels"] > 0
    if "source" in cap:  # measured (a growth too small to see falls back to the default, also fine)
        assert (
            cap["source"] == "rss" and cap["available_bytes"] > 0 and "measured at warm-up" in cap["reason"]
        )
    else:
        assert cap["pixels"] == UNMEASURED_CAP
