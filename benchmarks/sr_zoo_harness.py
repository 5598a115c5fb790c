"""The zoo harness: one architecture through checkpoint → import-sr → ONNX → parity → served runtime.

:func:`run_entry` writes the zoo network as a safetensors checkpoint (spandrel's keys, a license in
its metadata), imports it with the real ``import-sr`` code (context measurement, ONNX export,
parity on two photo tiles through the service's ONNX Runtime backend), times a tile, then serves
two photos of different sizes *concurrently* through the real :class:`service.runtime.Runtime`
(ONNX Runtime CPU backend, batching tile queue, stitching) and compares each served image with
one whole-image PyTorch forward of the same reflect-padded photo: tiles must not show.
"""

from __future__ import annotations

import asyncio
import io
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine_build.sr.zoo import ZooEntry

__all__ = ["SERVED_MIN_DB", "ZooResult", "run_entry", "serve_and_compare", "serve_sizes", "zoo_photo"]

#: Served (tiled, batched, stitched) vs one whole-image forward, uint8 PSNR. Exact-context networks
#: stitch to within rounding (≥ 50 dB); window-attention networks see other window partitions per
#: tile, which moves single pixels by a level or two but leaves no seam.
SERVED_MIN_DB = 40.0


@dataclass
class ZooResult:
    """One row of the coverage table."""

    arch: str
    variant: str
    family: str
    scale: int
    params_k: float = 0.0
    detected: str = ""  # "" until loaded; "yes" or what spandrel detected instead
    exported: str = ""  # precisions exported, e.g. "fp32,fp16"
    parity_db: float | None = None
    fp16_db: float | str | None = None  # dB on ORT CPU, or why not measured
    multiple: int | None = None
    tile: int | None = None
    overlap: int | None = None
    context: int | None = None
    context_measured: bool = False
    ms_per_tile: float | None = None
    served_db: float | None = None
    status: str = "failed"  # "served", "refused", "failed"
    reason: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("parity_db", "served_db", "fp16_db"):
            if isinstance(d[k], float) and math.isinf(d[k]):
                d[k] = "inf"
        return d


def zoo_photo(h: int, w: int, y: int = 40, x: int = 150) -> np.ndarray:
    """A uint8 HWC crop of a real photo (scikit-image's astronaut; the synthetic fallback else)."""
    from engine_build.commands.sr.common import photo_tile

    big = photo_tile(512)[0]
    return np.ascontiguousarray(big[y : y + h, x : x + w])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from engine_build.commands.sr.common import psnr_u8

    return psnr_u8(a, b)


def whole_image_reference(desc: Any, image: np.ndarray, tile: int, overlap: int, scale: int) -> np.ndarray:
    """One PyTorch forward over the whole photo, reflect-padded exactly as the runtime pads it."""
    from service.pixels.tiling import pad_image, plan_tiles

    plan = plan_tiles(image.shape[0], image.shape[1], tile, overlap, scale)
    padded = pad_image(image, plan)
    x = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        y = desc(x)
    out = torch.round(y.clamp(0, 1) * 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    my, mx, h, w = plan.margin_y, plan.margin_x, image.shape[0], image.shape[1]
    return np.ascontiguousarray(out[my * scale : (my + h) * scale, mx * scale : (mx + w) * scale])


async def _serve(repo: Path, name: str, images: list[np.ndarray], scale: int) -> list[np.ndarray]:
    from service.metrics import Metrics
    from service.runtime import Runtime, UpscaleJob
    from service.settings import Settings

    settings = Settings(
        model_repository=repo,
        models=[name],
        backend="onnxruntime-cpu",
        precision="fp32",
        max_batch=4,
        max_queue_delay_ms=20,
    )
    runtime = Runtime.from_settings(settings, Metrics())
    await runtime.start()
    try:
        model = runtime.get(name)

        async def one(i: int, img: np.ndarray) -> np.ndarray:
            h, w = img.shape[0] * scale, img.shape[1] * scale
            job = UpscaleJob(img, h, w, "none", time.monotonic() + 300, f"zoo-{i}")
            plan = model.plan(img.shape[0], img.shape[1], h, w)
            outcome = await model.upscale(job, model.reserve(plan))
            return outcome.image

        return list(await asyncio.gather(*(one(i, im) for i, im in enumerate(images))))
    finally:
        await runtime.close()


#: Output std (uint8 levels) below which random weights made a near-constant image: a comparison of
#: two constants proves nothing, so the row fails (fix the zoo entry's weight scale).
MIN_OUTPUT_STD = 2.0


def serve_sizes(tile: int, overlap: int) -> list[tuple[int, int]]:
    """Two photo sizes: one spanning at least 2×2 tiles (so seams exist), one smaller and oblong."""
    h, w = tile - overlap + 24, tile - overlap + 48
    return [(h, w), (max(8, tile // 2 - 5), max(8, tile // 2 + 19))]


def serve_and_compare(
    desc: Any, repo: Path, name: str, sizes: list[tuple[int, int]] | None = None
) -> list[float]:
    """Serve photos of `sizes` concurrently; PSNR of each against its whole-image PyTorch forward."""
    from service.manifest import read_manifest

    m = read_manifest(repo / name, verify=False)
    scale = m.native_scale
    sizes = sizes or serve_sizes(m.tile.tile, m.tile.overlap)
    images = [zoo_photo(h, w, y=20 + 30 * i, x=120 + 40 * i) for i, (h, w) in enumerate(sizes)]
    served = asyncio.run(_serve(repo, name, images, scale))
    for s, (h, w) in zip(served, sizes, strict=True):
        if s.shape != (h * scale, w * scale, 3):
            raise RuntimeError(f"served a {s.shape} image for a {w}×{h} ×{scale} request")
        if float(s.std()) < MIN_OUTPUT_STD:
            raise RuntimeError(f"the random weights give a near-constant image (std {float(s.std()):.2f})")
    refs = [whole_image_reference(desc, im, m.tile.tile, m.tile.overlap, scale) for im in images]
    return [_psnr(s, r) for s, r in zip(served, refs, strict=True)]


def _ms_per_tile(model_dir: Path, repeats: int = 3) -> float:
    from engine_build.commands.sr.common import parity_batch
    from service.backends.onnxruntime import OnnxRuntimeBackend
    from service.manifest import read_manifest

    m = read_manifest(model_dir, verify=False)
    b = OnnxRuntimeBackend(m, model_dir, provider="cpu", precision="fp32", max_batch=1)
    b.load()
    try:
        tile = parity_batch(m.tile.tile)[:1]
        b.infer(0, tile)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            b.infer(0, tile)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    finally:
        b.close()


def _fp16_parity(model_dir: Path, net: torch.nn.Module) -> float | str:
    from engine_build.commands.sr.common import one_line, parity_batch, parity_db
    from service.manifest import read_manifest

    if "fp16" not in read_manifest(model_dir, verify=False).onnx:
        return "not exported"
    tile = read_manifest(model_dir, verify=False).tile.tile
    try:
        return parity_db(model_dir, "fp16", net, parity_batch(tile))
    except Exception as e:  # ORT CPU lacks fp16 kernels for some ops: a GPU-only graph
        return f"ORT CPU cannot run it ({one_line(e, 80)})"


def run_entry(
    entry: ZooEntry,
    work: Path,
    *,
    precisions: tuple[str, ...] = ("fp32",),
    sizes: list[tuple[int, int]] | None = None,
    keep: bool = False,
) -> ZooResult:
    """Run one zoo entry end to end; never raises for a model failure (it is the row's reason)."""
    from engine_build.commands.sr.cli import import_sr
    from engine_build.commands.sr.common import CommandError, one_line
    from engine_build.sr.models import SRModelError, load_sr_safetensors, save_sr_checkpoint
    from engine_build.sr.support import SpandrelCall

    t0 = time.perf_counter()
    r = ZooResult(entry.arch, entry.variant, entry.family, entry.scale)
    repo = work / entry.slug
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    name = entry.slug.replace("_", "-")[:64]
    try:
        net = entry.build()
        state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        r.params_k = sum(v.numel() for v in state.values()) / 1e3
        ckpt = save_sr_checkpoint(
            state,
            repo / f"{name}.safetensors",
            architecture=entry.arch,
            scale=entry.scale,
            source="gendr-serve model zoo harness (random weights, seed 0)",
            license="CC0-1.0",
            extra={"attribution": f"random {entry.arch} weights made by engine_build.sr.zoo"},
        )
        del net, state
        try:
            desc = load_sr_safetensors(ckpt)
        except SRModelError as e:
            msg = str(e).split(": ", 1)[-1]
            r.detected = "refused"
            r.status, r.reason = ("refused" if "is not supported" in msg else "failed"), msg
            return r
        got = (desc.architecture.id, int(desc.scale))
        r.detected = "yes" if got == (entry.arch, entry.scale) else f"{got[0]} ×{got[1]}"
        out_dir = repo / "models" / name
        try:
            res = import_sr(ckpt, out_dir, name=name, precisions=precisions, stream=io.StringIO())
        except CommandError as e:
            if precisions == ("fp32",):
                r.status, r.reason = "failed", str(e).replace(f"{out_dir}: ", "")
                _fill_geometry(r, out_dir)
                return r
            # fp16 is a GPU extra: a graph that only fails in fp16 still serves fp32
            try:
                res = import_sr(ckpt, out_dir, name=name, precisions=("fp32",), stream=io.StringIO())
            except CommandError as e32:
                r.status, r.reason = "failed", str(e32).replace(f"{out_dir}: ", "")
                _fill_geometry(r, out_dir)
                return r
            r.fp16_db = f"fp16 export failed: {str(e).replace(f'{out_dir}: ', '')[:120]}"
        r.parity_db = res.parity_db
        _fill_geometry(r, out_dir)
        r.ms_per_tile = _ms_per_tile(out_dir)
        net_call = SpandrelCall(desc).eval()
        if "fp16" in precisions and r.fp16_db is None:
            r.fp16_db = _fp16_parity(out_dir, net_call)
        dbs = serve_and_compare(desc, repo / "models", name, sizes)
        r.served_db = min(dbs)
        if r.served_db >= SERVED_MIN_DB:
            r.status = "served"
        else:
            r.status = "failed"
            r.reason = f"tiles show: {r.served_db:.1f} dB vs the whole-image forward (< {SERVED_MIN_DB:g})"
    except Exception as e:  # a harness-level failure is still a row, with its reason
        r.status, r.reason = "failed", one_line(e)
    finally:
        r.seconds = time.perf_counter() - t0
        if not keep:
            shutil.rmtree(repo, ignore_errors=True)
    return r


def _fill_geometry(r: ZooResult, model_dir: Path) -> None:
    from service.manifest import ManifestError, read_manifest

    try:
        m = read_manifest(model_dir, verify=False)
    except ManifestError:
        return
    r.exported = ",".join(sorted(m.onnx))
    r.tile, r.overlap, r.multiple = m.tile.tile, m.tile.overlap, m.tile.size_multiple
    r.context, r.context_measured = m.tile.context, True
