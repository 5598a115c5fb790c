"""Load-time fallback: a backend that fails to load or warm up hands over to the next candidate of
`auto`'s list (TensorRT → ONNX Runtime CUDA → CPU), and the model says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import write_fake_repo
from test_runtime import arun, expected_fake, upscale

from service.backends.fake import FakeBackend
from service.metrics import Metrics
from service.runtime import ModelRuntime
from service.settings import Settings


class _BrokenLoad(FakeBackend):
    """A backend whose engine cannot load here (e.g. a plan from another TensorRT version)."""

    def load(self) -> None:
        raise RuntimeError("engine built with TensorRT 10.9.0, runtime is 10.13.0")

    @property
    def info(self):  # type: ignore[override]
        import dataclasses

        return dataclasses.replace(super().info, name="tensorrt")


def test_a_backend_that_fails_to_load_falls_back_to_the_next_and_says_why(tmp_path: Path) -> None:
    import concurrent.futures

    repo = write_fake_repo(tmp_path, name="fake", tile=32, overlap=8, scale=2)
    s = Settings(model_repository=repo, max_queue_delay_ms=5.0)
    from service.manifest import read_manifest

    man = read_manifest(repo / "fake", verify=False)
    host = concurrent.futures.ThreadPoolExecutor(2)
    good: list[FakeBackend] = []

    def next_backend() -> FakeBackend:
        good.append(FakeBackend(man, repo / "fake", max_batch=4))
        return good[-1]

    m = ModelRuntime(
        "fake",
        repo / "fake",
        man,
        _BrokenLoad(man, repo / "fake", max_batch=4),
        s,
        Metrics(),
        host,
        "auto: TensorRT engine matches",
        fallbacks=[("auto: ONNX Runtime CUDA", next_backend)],
    )
    m.load()
    assert m.backend is good[0] and m.batcher.backend is good[0] and m.ready
    d = m.describe()
    assert d["backend"] == "fake"
    assert (
        "fell back after: tensorrt failed to load: engine built with TensorRT 10.9.0" in d["selection_reason"]
    )
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
    out = arun(lambda: upscale(m, img, 40, 60))
    np.testing.assert_array_equal(out.image, expected_fake(img, 40, 60, m))
    m.close()
    # with nothing left to try, the load error is the model's error
    m2 = ModelRuntime("fake", repo / "fake", man, _BrokenLoad(man, repo / "fake"), s, Metrics(), host)
    with pytest.raises(RuntimeError, match=r"TensorRT 10\.9\.0"):
        m2.load()
    host.shutdown()
