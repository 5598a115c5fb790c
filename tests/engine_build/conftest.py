"""Session fixtures for the export-stage tests: one tiny GenDR export (and int8 quantization) shared by
every test, small real-photo sets, and a toy single network with an image-like output.

Everything heavy happens once per session; tests that change a repository work on a copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TILE, OVERLAP = (
    64,
    16,
)  # tiny-model tests: small tiles keep the suite fast (multiple of the tiny size_multiple 16)


@pytest.fixture(scope="session")
def small_photos(photos: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """Real photos; the first is a 200×200 crop so whole-image checks stay cheap (25 tiles at 64/16)."""
    return [
        ("chelsea-crop", np.ascontiguousarray(photos["chelsea"][40:240, 120:320])),
        ("astronaut", photos["astronaut"]),
        ("coffee", photos["coffee"]),
        ("rocket", photos["rocket"]),
    ]


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """models/tiny exported once (fp32 + fp16, tile 64, overlap 16)."""
    from engine_build.export.exporter import export_gendr

    out = tmp_path_factory.mktemp("repo") / "tiny"
    return export_gendr(tiny_checkpoint, out, tile=TILE, overlap=OVERLAP)


@pytest.fixture(scope="session")
def tiny_repo(tiny_export) -> Path:
    return tiny_export.model_dir


@pytest.fixture
def repo_copy(tiny_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny repository for tests that modify it."""
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_repo, dst)
    return dst


@pytest.fixture(scope="session")
def int8_repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the tiny repository with an int8 Q/DQ graph (max calibration on 8 real-photo tiles)."""
    from engine_build.quantize.quantizer import quantize_model

    dst = tmp_path_factory.mktemp("int8") / "tiny"
    shutil.copytree(tiny_repo, dst)
    res = quantize_model(dst, "int8", calib="builtin", n_tiles=8, method="max")
    return res


@pytest.fixture(scope="session")
def tiny_report(int8_repo, small_photos):
    """verify_model over fp32 / fp16 / int8 of the tiny repository (4 tiles + 1 whole image each)."""
    from engine_build.verify.parity import verify_model

    return verify_model(int8_repo.model_dir, photos=small_photos, n_tiles=4, n_images=1, batch=8)


class ToySR(torch.nn.Module):
    """A ×4 single network whose output looks like a photo: bicubic ×4 plus a small seeded conv residual.

    A random RRDBNet outputs near-constant images (every parity number is trivially high); this keeps
    the error measurable against real image content, which makes the int8/fp16 bounds meaningful.
    """

    def __init__(self, seed: int = 0, width: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.c2 = torch.nn.Conv2d(width, 3, 3, padding=1)
        with torch.no_grad():
            for c in (self.c1, self.c2):
                c.weight.copy_(torch.randn(c.weight.shape, generator=g) * 0.2)
                c.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [0,1] → [0,1] at 4×
        up = torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
        return (up + 0.1 * self.c2(torch.relu(self.c1(up)))).clamp(0, 1)


@pytest.fixture(scope="session")
def toy_sr_export(tmp_path_factory: pytest.TempPathFactory):
    from engine_build.export.exporter import export_single
    from service.manifest import Source

    net = ToySR().eval()
    out = tmp_path_factory.mktemp("toy") / "toy-sr"
    res = export_single(
        net, 4, out, "toy-sr", tile=32, overlap=4, source=Source(description="toy ×4 test net")
    )
    return net, res
