"""The PyTorch reference path: GenDR (or any TileGraph-able net) on CPU/CUDA in fp32/fp16/bf16.

Whole images go through `service.pipeline.run_sync`, the same resize/tile/stitch/colour-fix code the
service runs, so the reference differs from the served path only in the engine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from engine_build.model import GenDR, TileGraph
from service.manifest import TileGeometry
from service.pipeline import run_sync

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Default GenDR tiling: 512 px tiles are GenDR's training crop (paper §4.1) and SD2.1's 64×64 latent;
# 64 px overlap = 8 latent pixels, enough for feathered blending to hide per-tile GroupNorm shifts.
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA GPU is available")
    return dev


class TorchTileRunner:
    """Callable uint8 [B,t,t,3] → uint8 [B,t·s,t·s,3] running a network through TileGraph."""

    def __init__(self, net: nn.Module, device: str = "cpu", dtype: str = "fp32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise ValueError("fp16 on CPU is not supported by PyTorch kernels here; use fp32 or bf16")
        self.graph = TileGraph(net, compute_dtype=self.dtype).to(self.device, self.dtype).eval()

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        return self.graph(x).cpu().numpy()


def gendr_geometry(model: GenDR, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> TileGeometry:
    return TileGeometry(tile=tile, overlap=overlap, graph_scale=1, size_multiple=model.size_multiple)


def upscale_image(
    runner: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    out_h: int,
    out_w: int,
    geometry: TileGeometry,
    *,
    color_fix: str = "none",
    batch: int = 1,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    return run_sync(
        image, out_h, out_w, geometry, runner, batch=batch, color_fix=color_fix, progress=progress
    )


@torch.inference_mode()
def upscale_untiled(model: GenDR, image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """DESIGN.md §1 on the whole image at once (reflect-padded to the size multiple): the ground truth
    that tiled output is compared against. Memory grows with the image: tests and small images only."""
    from service.imageops import resize_rgb

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
