"""The PyTorch reference pipeline: output sizes, determinism, odd sizes, tiling, and the CLI."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine_build.gendr.checkpoint import load_checkpoint  # noqa: E402
from engine_build.gendr.reference import gendr_geometry, upscale_untiled  # noqa: E402
from engine_build.verify.runners import torch_runner  # noqa: E402
from service.manifest import TileGeometry  # noqa: E402
from service.pixels.imageops import target_size  # noqa: E402
from service.pixels.pipeline import make_plan, run_sync  # noqa: E402

TILE, OVERLAP = 64, 16


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path):
    model = load_checkpoint(tiny_checkpoint)
    return model, torch_runner(model), gendr_geometry(model, TILE, OVERLAP)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(255**2 / max(mse, 1e-12))


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"scale": 1}, (45, 61)),
        ({"scale": 2}, (90, 122)),
        ({"scale": 4}, (180, 244)),
        ({"out_width": 100}, (74, 100)),  # aspect kept
        ({"out_height": 30}, (30, 41)),
        ({"out_width": 77, "out_height": 33}, (33, 77)),  # explicit size, any aspect
    ],
)
def test_output_sizes(tiny, photos, kw: dict, expected: tuple[int, int]) -> None:
    _, runner, geo = tiny
    img = photos["coffee"][::6, ::6][:45, :61]  # 61×45: not divisible by 8
    oh, ow = target_size(*img.shape[:2], **kw)
    out = run_sync(img, oh, ow, geo, runner, batch=4)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8


def test_deterministic(tiny, photos) -> None:
    _, runner, geo = tiny
    img = photos["chelsea"][::6, ::6]
    size = (img.shape[0] * 2, img.shape[1] * 2)
    a = run_sync(img, *size, geo, runner, batch=3)
    np.testing.assert_array_equal(a, run_sync(img, *size, geo, runner, batch=3))
    # Another batch size may pick other CPU kernels: float sums differ in the last bits, which can move
    # a value sitting on a .5 rounding boundary by one level, never more.
    b = run_sync(img, *size, geo, runner, batch=1)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize("size", [(1, 1), (7, 5), (13, 70), (65, 33)])
def test_tiny_and_odd_sizes(tiny, photos, size: tuple[int, int]) -> None:
    _, runner, geo = tiny
    img = photos["rocket"][: size[0], : size[1]]
    out = run_sync(img, size[0] * 2, size[1] * 2, geo, runner)
    assert out.shape == (size[0] * 2, size[1] * 2, 3)


def test_untiled_handles_sizes_not_divisible_by_the_network(tiny, photos) -> None:
    model, _, _ = tiny
    img = photos["astronaut"][:37, :51]
    assert upscale_untiled(model, img, 74, 102).shape == (74, 102, 3)


def _seam_score(img: np.ndarray, positions: tuple[int, ...], tile: int, margin: int, axis: int) -> float:
    """Largest gradient across any column (row) inside a tile overlap, relative to the image's median.

    A seam is a line whose gradient stands out from the rest of the image."""
    d = np.abs(np.diff(img.astype(np.float32), axis=axis)).mean(axis=(1 - axis, 2))
    cols = {
        x - margin
        for a, b in itertools.pairwise(positions)
        for x in range(b - 1, max(a + tile, b + 1))
        if 0 <= x - margin < len(d)
    }
    return float(d[sorted(cols)].max() / np.median(d))


def test_no_seams_across_tile_borders(tiny, photos) -> None:
    """Tiled GenDR output shows no line at tile borders that the untiled output does not show too.

    Bound: the seam score of the tiled image ≤ 1.25 × that of the untiled image on the same lines.
    The untiled score is what the content itself gives on those lines (measured 1.3–1.8 on these
    photos with the tiny model); a stitching seam adds a discontinuity on top (naive abutting tiles
    reached 1.2× the untiled score on one axis in our measurements)."""
    model, runner, geo = tiny
    for name in ("astronaut", "coffee"):
        img = photos[name][::3, ::3]
        h, w = img.shape[:2]
        tiled = run_sync(img, h, w, geo, runner, batch=4)
        untiled = upscale_untiled(model, img, h, w)
        tp = make_plan(h, w, h, w, geo).tiles
        for axis, pos in ((1, tp.xs), (0, tp.ys)):
            m = tp.margin_x if axis == 1 else tp.margin_y
            st = _seam_score(tiled, pos, tp.tile, m, axis)
            su = _seam_score(untiled, pos, tp.tile, m, axis)
            assert st <= 1.25 * su, (name, axis, st, su)


class LocalNet(torch.nn.Module):
    """A random fully convolutional ×2 network: receptive field 9 px in input pixels."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(3 if i == 0 else 8, 8 if i < 3 else 12, 3, padding=1) for i in range(4)
        )
        for c in self.convs:
            torch.nn.init.normal_(c.weight, std=0.15, generator=g)
        self.shuffle = torch.nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs[:-1]:
            x = torch.nn.functional.leaky_relu(c(x), 0.2)
        return torch.tanh(self.shuffle(self.convs[-1](x)))


def test_tiling_is_exact_for_a_local_network(photos) -> None:
    """The planner, reflect padding and feathered stitching add no error of their own: for a network
    whose receptive-field radius (4 px) is ≤ overlap/4 and ≤ margin (overlap/2), tiled == untiled up to
    uint8 rounding of the blended overlaps."""
    net = LocalNet().eval()
    runner = torch_runner(net)
    geo = TileGeometry(tile=48, overlap=16, graph_scale=2, size_multiple=1)
    img = photos["astronaut"][::4, ::4][:90, :110]
    tiled = run_sync(img, 180, 220, geo, runner, batch=5)
    x = torch.from_numpy(np.pad(img, ((8, 8), (8, 8), (0, 0)), mode="reflect")).permute(2, 0, 1)[None]
    with torch.inference_mode():
        y = net(x.float() / 127.5 - 1)[0, :, 16:-16, 16:-16]
    untiled = torch.round((y + 1) * 127.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    assert np.abs(tiled.astype(int) - untiled.astype(int)).max() <= 1
    assert psnr(tiled, untiled) > 50


def test_cli_upscales_a_folder_and_reports_failures(tiny_checkpoint: Path, photos, tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photos["astronaut"][::8, ::8]).save(src / "astro.png")
    Image.fromarray(photos["coffee"][::8, ::8]).save(src / "coffee.jpg", quality=90)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine_build.cli",
            "upscale",
            str(src),
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--scale",
            "2",
            "--tile",
            "64",
            "--overlap",
            "16",
            "--batch",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr  # one file failed → non-zero, but the others were written
    assert "broken.jpg" in r.stderr and "upscaled 2/3" in r.stdout
    assert Image.open(out / "astro.png").size == (128, 128)
    assert Image.open(out / "coffee.jpg").size == (150, 100)


def test_cli_make_tiny(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "engine_build.cli", "make-tiny", "--out", str(tmp_path / "t"), "--seed", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tmp_path / "t").params.native_scale == 4


def test_cli_bad_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.pth").write_bytes(b"junk")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine_build.cli",
            "upscale",
            str(tmp_path),
            "--checkpoint",
            str(tmp_path / "x.pth"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "pickle" in r.stderr and "Traceback" not in r.stderr


def test_cli_reads_16_bit_grayscale_without_clipping(tmp_path: Path) -> None:
    from PIL import Image

    from engine_build.commands.reference import load_rgb

    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "g16.png")
    rgb, alpha, _ = load_rgb(tmp_path / "g16.png")
    assert rgb.shape == (8, 8, 3) and alpha is None
    assert abs(int(rgb[0, 0, 0]) - round(30000 * 255 / 65535)) <= 1  # not clipped to 255
