"""Shared fixtures: a tiny GenDR checkpoint, real photos, and the `gpu` marker's skip rule."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest


def _has_gpu() -> bool:
    if os.environ.get("GENDR_TEST_FORCE_NO_GPU"):
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (marker `gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _auto_backend_without_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` ignores OpenVINO in tests: it wins on bf16 CPUs where it is installed, which would make the
    suite's backend expectations depend on the machine (test_openvino_cpu.py re-enables it)."""
    try:
        from service.backends import select
    except ImportError:
        return
    monkeypatch.setattr(select, "openvino_candidate", lambda *_a, **_k: None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from engine_build.gendr.checkpoint import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos that ship inside scikit-image (docs/architecture.md, test data), as HWC uint8 RGB."""
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
    }
