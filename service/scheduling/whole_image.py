"""The whole-image cap: the most input pixels one dynamic-shape engine call may take.

Why from the hardware: whole images are the cheapest plan for a CNN (no overlaps, no stitching, one call;
measured in the peer benchmark: with a 1 MP cap 0.95× a hand-written app's throughput at 150 % load,
with the old fixed 65,536 px 0.72×), but a call's activations grow with its pixels, and what fits
depends on the machine. So under `auto` the backend measures the peak memory of whole-image calls at two
sizes at warm-up (service/backends/memory.py) and the cap is what fits in a share of the memory still
free after loading, shared by the instances that may each run one such call at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.backends.base import Backend
from service.backends.memory import MemoryFit
from service.manifest import Manifest
from service.settings import AutoPixels, Settings

#: The cap when `auto` cannot measure (a backend without a memory reader): the former fixed default.
UNMEASURED_CAP = 65_536


@dataclass(frozen=True)
class WholeImageCap:
    pixels: int  # input pixels of one whole-image call; 0: no whole-image calls
    reason: str
    fit: MemoryFit | None = None
    budget_bytes: int = 0

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"pixels": self.pixels, "reason": self.reason}
        if self.fit is not None:
            out.update(
                source=self.fit.source,
                bytes_per_pixel=round(self.fit.bytes_per_pixel, 1),
                fixed_bytes=int(self.fit.fixed_bytes),
                available_bytes=self.fit.available_bytes,
                budget_bytes=self.budget_bytes,
            )
        return out


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def resolve_cap(
    setting: int,
    *,
    dynamic: bool,
    fit: MemoryFit | None,
    share: float,
    instances: int,
    tile: int,
    max_pixels: int,
) -> WholeImageCap:
    """The cap and why. `tile`: the primary tile edge (a cap below one tile is no use: tiles then);
    `max_pixels`: the largest input the server accepts (a larger cap changes nothing)."""
    if not dynamic:
        return WholeImageCap(0, "no dynamic-shape graph: static tiles only")
    if not isinstance(setting, AutoPixels):
        what = "off" if setting == 0 else f"{setting:,} px"
        return WholeImageCap(setting, f"set: GENDR_WHOLE_IMAGE_MAX_PIXELS={setting} ({what})")
    if fit is None or fit.bytes_per_pixel <= 0:
        why = f"auto: this backend did not measure its memory; the default {UNMEASURED_CAP:,} px"
        return WholeImageCap(UNMEASURED_CAP, why)
    budget = int(share * fit.available_bytes / max(1, instances))
    pixels = int((budget - fit.fixed_bytes) / fit.bytes_per_pixel)
    why = (
        f"auto: {fit.bytes_per_pixel:,.0f} B per input pixel ({fit.source}, measured at warm-up); "
        f"{share:g} × {_mb(fit.available_bytes)} free after loading"
        + (f" ÷ {instances} instances" if instances > 1 else "")
        + f" = {_mb(budget)} per call"
    )
    if pixels < tile * tile:
        return WholeImageCap(0, why + f": less than one {tile}² tile, so tiles only", fit, budget)
    if pixels >= max_pixels:
        return WholeImageCap(max_pixels, why + f": every accepted image ({max_pixels:,} px)", fit, budget)
    return WholeImageCap(pixels, why + f" → {pixels:,} px", fit, budget)


def cap_for(settings: Settings, manifest: Manifest, dynamic: bool, backend: Backend) -> WholeImageCap:
    """The cap of a loaded model: its backend's measurement (`whole_image_memory`, set at warm-up by the
    backends that measure) against the setting."""
    g = manifest.tile.graph_scale
    return resolve_cap(
        settings.whole_image_max_pixels,
        dynamic=dynamic,
        fit=getattr(backend, "whole_image_memory", None),
        share=settings.whole_image_memory_share,
        instances=backend.info.instances,
        tile=manifest.tile.tile,
        max_pixels=-(-settings.max_output_pixels // (g * g)),  # the largest graph input a request can need
    )
