"""Runtime test fixtures: a tiny GenDR model repository (a real ONNX export) and its PyTorch twin.

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
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """models/ with `tiny`: the tiny random GenDR exported by engine_build.export (fp32 ONNX + checkpoint)."""
    from engine_build.export import export_gendr

    repo = tmp_path_factory.mktemp("models")
    export_gendr(tiny_checkpoint, repo / "tiny", tile=TINY_TILE, overlap=TINY_OVERLAP, precisions=("fp32",))
    return repo


@pytest.fixture(scope="session")
def tiny_net(tiny_checkpoint: Path):
    """The same tiny GenDR in PyTorch (the reference)."""
    from engine_build.checkpoint import load_checkpoint

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
