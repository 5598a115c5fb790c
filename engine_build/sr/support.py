"""What it takes to serve a spandrel network tile by tile: its call, its tile multiple, its context.

* :class:`SpandrelCall` is the exported module: spandrel's own call function around the network
  (FBCNN and MMRealSR return tuples, MixDehazeNet works in [-1, 1], DRUNet and FDnCNN take a noise
  map channel), made batch-safe where spandrel's builds a batch-1 noise map.
* :func:`tile_multiple` is the size a tile must be a multiple of: spandrel's size requirement and
  the attention windows, so no tile is padded inside the network (window models pad the bottom and
  right edge of every tile otherwise, which shows as seams).
* :func:`measure_context` measures, on a real photo, how many input pixels around an output pixel
  change it by more than one uint8 level. Tiles stitch exactly when the overlap is at least
  :func:`overlap_for_context` of it (the stitcher's ramp ignores the outer quarter of an overlap).
* :data:`REFUSED` names the architectures ``import-sr`` refuses, with the reason.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from engine_build.sr.fixes import dense_moe, tracing_fixes

__all__ = [
    "REFUSED",
    "SpandrelCall",
    "context_photo_size",
    "measure_context",
    "overlap_for_context",
    "refusal",
    "tile_multiple",
]

#: Architectures that cannot be served as image → image tiles, and why (one line each).
REFUSED: dict[str, str] = {
    "GFPGAN": "face restoration: it restores one aligned 512×512 face crop, not a photo tile by tile",
    "RestoreFormer": "face restoration: it restores one aligned 512×512 face crop, not a photo tile by tile",
    "LaMa": "inpainting: it needs a mask input besides the image; the service maps one image to one image",
    # Measured by the zoo harness (benchmarks/sr_zoo.py, docs/models.md): what keeps each from being
    # served correctly tile by tile today. Each is one fix away; remove the line with the fix.
    "AuraSR": "its convolution kernels are computed at run time, which the ONNX exporter cannot trace",
    "ATD": "its token sorting exports with only 47.5–48 dB parity against PyTorch (the bound is 50 dB)",
    "CRAFT": "its output depends on the whole image (tiled vs whole-image forward: 22–23 dB; seams show)",
    "DITN": "its ONNX graph keeps the trace's batch size in a Reshape, so batches of another size fail",
    "FBCNN": "it estimates JPEG quality from the whole image, so tiles disagree (35 dB vs whole-image)",
    "FFTformer": "it uses a 2-D FFT (aten::fft_rfft2), which has no ONNX export at opset 18",
    "GRL": "its global attention needs over 12 GB of memory to export even at the smallest size",
    "HVICIDNet": "its ONNX graph keeps the trace's batch size in a ScatterND: other batch sizes fail",
    "IPT": "its multi-task patch wrapper feeds the wrong channel count when traced (export fails)",
    "SCUNet": "its output depends on the whole image (tiled vs whole-image forward: 24 dB; seams show)",
    "Uformer": "its output depends on the whole image (tiled vs whole-image forward: 30 dB; seams show)",
}


def refusal(arch: str, purpose: str, image_to_image: bool) -> str | None:
    """The one-line reason ``arch`` is not served, or None when it may be."""
    if arch in REFUSED:
        return REFUSED[arch]
    if not image_to_image:
        return f"{purpose}: not an image → image model"
    if purpose == "FaceSR":
        return "face restoration: it restores aligned face crops only, not a photo tile by tile"
    return None


def _noise_map_call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DRUNet / FDnCNN: the noise-level channel (15/255, spandrel's default) for every batch item."""
    noise = torch.full_like(x[:, :1], 15.0 / 255.0)
    return model(torch.cat([x, noise], dim=1))


class SpandrelCall(nn.Module):
    """[0,1] NCHW → [0,1] at the descriptor's scale, exactly as spandrel calls the network."""

    def __init__(self, desc: Any) -> None:
        super().__init__()
        self.model = desc.model
        self.arch = desc.architecture.id
        needs_noise = self.arch == "DRUNet" or (
            self.arch == "DnCNN" and getattr(desc.model, "mode", "") == "FDnCNN"
        )
        self._call = _noise_map_call if needs_noise else getattr(desc, "_call_fn", None)
        if self.arch == "SeemoRe":
            dense_moe(self.model)
        for m in self.model.modules():  # a 0-dim counter only training reads; not an export input
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with tracing_fixes(self.arch):
            y = self.model(x) if self._call is None else self._call(self.model, x)
        return y.clamp(0.0, 1.0)


def _ints(v: Any) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return [v]
    if isinstance(v, list | tuple) and all(isinstance(i, int) for i in v):
        return list(v)
    return []


def tile_multiple(desc: Any) -> int:
    """lcm of spandrel's ``multiple_of`` and the network's attention window / stripe sizes."""
    m = max(1, int(desc.size_requirements.multiple_of))
    model = desc.model
    for attr in ("window_size", "win_size", "split_size", "stripe_size"):
        for v in _ints(getattr(model, attr, None)):
            if 1 < v <= 64:
                m = math.lcm(m, v)
    return m


def _to_uint8(y: torch.Tensor) -> np.ndarray:
    return torch.round(y.clamp(0, 1) * 255).to(torch.uint8).numpy()


def measure_context(
    fn: nn.Module,
    scale: int,
    image: np.ndarray,
    multiple: int = 1,
    max_context: int = 64,
    centre: int = 16,
    minimum: int = 0,
) -> int | None:
    """Input pixels of context an output pixel needs to be exact to ±1 uint8 level (None: more than
    ``max_context``, e.g. global pooling).

    ``image`` is a uint8 HWC photo at least :func:`context_photo_size` square. The network's output
    for a centre block inside the whole crop is compared with its output for the block cut out with
    ``m`` pixels of context, for growing ``m`` (multiples of ``multiple``, so window partitions line
    up with the full run's). Crops smaller than the network's ``minimum`` input are skipped.
    """
    step = max(1, multiple)
    centre = -(-centre // step) * step
    max_context = -(-max_context // step) * step
    size = context_photo_size(max_context, step, centre)
    if image.shape[0] < size or image.shape[1] < size:
        raise ValueError(f"the photo must be at least {size}×{size} to measure {max_context} px of context")
    x = torch.from_numpy(np.ascontiguousarray(image[:size, :size])).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        full = _to_uint8(fn(x))
    # the full run has context beyond the largest crop, so "exact at max_context" is a real finding
    a, s = (size - centre) // 2, scale
    want = full[..., a * s : (a + centre) * s, a * s : (a + centre) * s].astype(np.int16)
    ladder = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
    candidates = sorted({-(-c // step) * step for c in ladder if c <= max_context})
    candidates = [m for m in candidates if centre + 2 * m >= minimum]
    for m in candidates:
        crop = x[..., a - m : a + centre + m, a - m : a + centre + m]
        with torch.inference_mode():
            out = _to_uint8(fn(crop))
        got = out[..., m * s : (m + centre) * s, m * s : (m + centre) * s].astype(np.int16)
        if np.abs(got - want).max() <= 1:
            return m
    return None


def context_photo_size(max_context: int, multiple: int = 1, centre: int = 16) -> int:
    """Edge of the photo :func:`measure_context` needs: the largest crop plus a margin beyond it."""
    step = max(1, multiple)
    centre = -(-centre // step) * step
    max_context = -(-max_context // step) * step
    extra = -(-8 // step) * step
    return 2 * (max_context + extra) + centre


def overlap_for_context(context: int) -> int:
    """Overlap at which tiles stitch exactly: the blending ramp gives zero weight to the outer quarter
    of an overlap, so every output pixel that counts has ≥ overlap/4 pixels of context."""
    return 4 * context
