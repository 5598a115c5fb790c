"""Runtime test fixtures: a tiny model repository written without torch (tiny_onnx.py), and — for the
few tests about GenDR itself — the tiny GenDR in PyTorch (skipped where torch is not installed).

Helpers shared by the runtime tests live in runtime_helpers.py (a uniquely named module, importable).
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Tile geometry of the tiny test model: 64-px tiles (the tiny GenDR accepts multiples of 16),
# 16 px of overlap. ~15 ms per tile in ONNX Runtime on one core.
TINY_TILE = 64
TINY_OVERLAP = 16


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/ with `tiny`: a tiny local SR graph written with onnx.helper (tests/service/tiny_onnx.py),
    no torch: the runtime's tests also run where only the `serve` extra is installed."""
    from tiny_onnx import write_repo

    repo = tmp_path_factory.mktemp("models")
    write_repo(repo, "tiny")
    return repo


@pytest.fixture(scope="session")
def tiny_net(tiny_checkpoint: Path):
    """The tiny GenDR in PyTorch, for the tests about GenDR itself (tiling seams); needs torch."""
    from engine_build.gendr.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture
def torch_one_thread():
    """torch with one intra-op thread: on a busy 2-core machine two threads spin against each other
    and a tiny-model tile takes 10-20× longer."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
