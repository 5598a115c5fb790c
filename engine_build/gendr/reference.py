"""The PyTorch reference path's pieces: GenDR's default tiling, and the untiled ground truth.

Tiled reference runs go through `service.pixels.pipeline.run_sync` with `verify.runners.torch_runner`
(the service's torch backend), the same resize/tile/stitch/colour-fix code the service runs, so the
reference differs from the served path only in the engine.
"""

from __future__ import annotations

import numpy as np
import torch

from engine_build.gendr.model import GenDR
from engine_build.gendr.presets import GENDR_OVERLAP, GENDR_TILE
from service.manifest import TileGeometry

DEFAULT_TILE, DEFAULT_OVERLAP = GENDR_TILE, GENDR_OVERLAP  # engine_build/gendr/presets.py


def gendr_geometry(model: GenDR, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> TileGeometry:
    return TileGeometry(tile=tile, overlap=overlap, graph_scale=1, size_multiple=model.size_multiple)


@torch.inference_mode()
def upscale_untiled(model: GenDR, image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """docs/model.md on the whole image at once (reflect-padded to the size multiple): the ground truth
    that tiled output is compared against. Memory grows with the image: tests and small images only."""
    from service.pixels.imageops import resize_rgb

    x_up = resize_rgb(image, out_h, out_w)
    m = model.size_multiple
    ph, pw = (-out_h) % m, (-out_w) % m
    x = torch.from_numpy(np.ascontiguousarray(x_up).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    if ph or pw:
        mode = "reflect" if min(out_h, out_w) > max(ph, pw) else "replicate"
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
    y = model(x)[:, :, :out_h, :out_w]
    y = torch.round((y.clamp(-1, 1) + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return y[0].permute(1, 2, 0).numpy()
