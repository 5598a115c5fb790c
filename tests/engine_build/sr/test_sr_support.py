"""Serving a spandrel network tile by tile (engine_build/sr/support.py, import-sr's geometry).

The 4 × context rule is checked against the real stitcher: a box filter of known radius stitches
exactly at the overlap the rule gives and shows seams at a smaller one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("spandrel")

import spandrel  # noqa: E402
from torch import nn  # noqa: E402

from engine_build.commands.sr.cli import MAX_MEASURED_CONTEXT, import_geometry  # noqa: E402
from engine_build.sr.fixes import tracing_fixes  # noqa: E402
from engine_build.sr.support import (  # noqa: E402
    SpandrelCall,
    measure_context,
    overlap_for_context,
    refusal,
    tile_multiple,
)
from engine_build.sr.zoo import entries  # noqa: E402
from service.manifest import TileGeometry  # noqa: E402
from service.pixels.pipeline import run_sync  # noqa: E402


class Box(nn.Module):
    """A (2r+1)² mean filter: context exactly r (each outer pixel moves the output by ≥ 1 level)."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 2 * r + 1, padding=r, bias=False, groups=3)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / (2 * r + 1) ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class GlobalMean(nn.Module):
    """Contrast around the image mean: every output pixel depends on every input pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - x.mean(dim=(2, 3), keepdim=True)) * 8 + 0.5).clamp(0, 1)


def _photo(n: int) -> np.ndarray:
    return zoo_photo(n, n, y=0, x=100)


@pytest.mark.parametrize("r", [1, 3, 6])
def test_context_of_a_box_filter_is_its_radius(r: int) -> None:
    assert measure_context(Box(r), 1, _photo(160), max_context=48) == r


def test_global_pooling_has_no_finite_context() -> None:
    assert measure_context(GlobalMean(), 1, _photo(160), max_context=32) is None


def _tile_fn(net: nn.Module):
    def fn(tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            y = net(x)
        return torch.round(y.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    return fn


def _whole(net: nn.Module, img: np.ndarray, margin: int) -> np.ndarray:
    padded = np.pad(img, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    out = _tile_fn(net)(np.ascontiguousarray(padded)[None])[0]
    return out[margin : margin + img.shape[0], margin : margin + img.shape[1]]


def test_overlap_of_four_times_the_context_stitches_exactly_and_less_shows_seams() -> None:
    net, r = Box(4), 4
    img = zoo_photo(150, 170)
    need = overlap_for_context(r)
    exact = run_sync(
        img, 150, 170, TileGeometry(tile=48, overlap=need, graph_scale=1, size_multiple=1), _tile_fn(net)
    )
    assert np.array_equal(exact, _whole(net, img, need // 2))
    small = 2 * r  # half the rule: the ramp now counts pixels that saw the tile's zero padding
    seams = run_sync(
        img, 150, 170, TileGeometry(tile=48, overlap=small, graph_scale=1, size_multiple=1), _tile_fn(net)
    )
    assert np.abs(seams.astype(int) - _whole(net, img, small // 2).astype(int)).max() > 2


def _desc(key: str):
    e = entries([key])[0]
    return spandrel.ModelLoader().load_from_state_dict(dict(e.build().state_dict()))


def test_window_models_tile_at_a_multiple_of_their_window() -> None:
    swin = _desc("SwinIR x2")
    assert tile_multiple(swin) == 8  # spandrel says 1: SwinIR pads internally
    tile, overlap, multiple, _ = import_geometry(swin, None, None, 3)
    assert multiple == 8 and tile % 8 == 0 and overlap == 16
    tile, overlap, _, _ = import_geometry(swin, None, None, 12)
    assert overlap == 48 and tile >= 3 * 48 and tile % 8 == 0


def test_geometry_notes_a_context_wider_than_measured_and_a_user_overlap_too_small() -> None:
    compact = _desc("Compact x4")
    tile, overlap, _, notes = import_geometry(compact, None, None, None)
    assert overlap == 2 * MAX_MEASURED_CONTEXT and 2 * overlap < tile
    assert any("blended, not exact" in n for n in notes)
    _, _, _, notes = import_geometry(compact, 64, 8, 5)
    assert notes == ["overlap 8 < the 20 px this network needs to stitch exactly"]


def test_noise_map_networks_run_batched() -> None:
    """spandrel builds DRUNet's noise map for batch 1; the exported call must take any batch."""
    call = SpandrelCall(_desc("DRUNet")).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        y = call(x)
        one = call(x[1:2])
    assert y.shape == (3, 3, 32, 32) and torch.allclose(y[1:2], one, atol=1e-5)


def test_static_pool_sizes_only_while_tracing() -> None:
    import torch.nn.functional as F

    before = F.adaptive_max_pool2d
    with tracing_fixes("SAFMN"):
        assert F.adaptive_max_pool2d is before  # not tracing: nothing swapped

    class Pool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            with tracing_fixes("SAFMN"):
                return F.adaptive_max_pool2d(x, (h // 4, w // 4))

    x = torch.rand(2, 3, 16, 24)
    traced = torch.jit.trace(Pool(), x)
    assert torch.equal(traced(x), F.adaptive_max_pool2d(x, (4, 6)))
    assert F.adaptive_max_pool2d is before


def test_refusals_name_the_reason() -> None:
    assert "mask" in str(refusal("LaMa", "Inpainting", False))
    assert "face" in str(refusal("GFPGAN", "FaceSR", True))
    assert "not an image → image" in str(refusal("SomeNew", "Inpainting", False))
    assert refusal("ESRGAN", "SR", True) is None


def test_old_manifests_without_context_still_load() -> None:
    old = {"tile": 96, "overlap": 16, "graph_scale": 4, "size_multiple": 1}
    g = TileGeometry.model_validate_json(json.dumps(old))
    assert g.context is None and g.needed_overlap is None
    new = TileGeometry(**old, context=6, needed_overlap=24)
    assert TileGeometry.model_validate_json(new.model_dump_json()) == new


def test_zoo_covers_every_spandrel_architecture() -> None:
    known = {a.architecture.id for a in spandrel.MAIN_REGISTRY.architectures()}
    assert known <= {e.arch for e in entries()}
    assert len({e.key for e in entries()}) == len(entries())  # no duplicate rows


def test_results_path_is_in_the_repository() -> None:
    assert (Path(__file__).resolve().parents[3] / "benchmarks" / "sr_zoo.py").is_file()


def zoo_photo(h: int, w: int, y: int = 40, x: int = 150) -> np.ndarray:
    """A crop of a real photo, the same one the zoo harness (benchmarks/sr_zoo_harness.py) serves."""
    from engine_build.commands.sr.common import photo_tile

    return np.ascontiguousarray(photo_tile(512)[0][y : y + h, x : x + w])
