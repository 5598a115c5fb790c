"""How long the server will take for an image, from the server's own numbers (GET /v1/models).

Why: a fixed rule (60 s read timeout, a job above 4 MP of output at ×4) is wrong both ways. On a CPU a
3 MP result takes longer than 60 s, so the request timed out and was sent again, doubling the work; on
a GPU a 16 MP result takes seconds and needs no job. /v1/models publishes each model's native scale,
tile geometry, instances and the cost table the server's planner uses (seconds per engine call by
input shape and batch, measured at warm-up and updated by every batch), so the client prices the work
the same way: tiles × seconds per tile ÷ instances.

Without /v1/models (an older server, a proxy that does not route it) the old constants apply.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from gendr_client._core import Options

#: Work the server estimates above this many seconds goes through a job: a third of the ~60 s that
#: common proxies and ingresses allow one request, the rest being the margin of an estimate.
JOB_ABOVE_S = 20.0
#: The read timeout of a direct request without an estimate (and the old fixed value).
FALLBACK_READ_TIMEOUT_S = 60.0
#: With an estimate: margin × own work + the longest wait the server's admission allows + slack, at
#: least this (a dead connection is still noticed; a GC pause or a slow encode is not a failure).
READ_TIMEOUT_MIN_S = 30.0
READ_MARGIN = 3.0
READ_SLACK_S = 10.0
#: After /v1/models failed, ask again at most this often (a server that was still starting).
INFO_RETRY_S = 60.0
#: Without /v1/models: work above this many output pixels (at ×4 when no size is given) is a job...
JOB_OUTPUT_PIXELS = 4_000_000
#: ...and, when the image's size cannot be read locally (no Pillow), an input above this many bytes.
JOB_INPUT_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class ModelInfo:
    """What the client needs of one model's /v1/models entry."""

    native_scale: float
    tile: int  # the primary (largest) static input tile edge
    overlap: int
    graph_scale: int
    instances: int
    per_tile_s: float | None  # engine seconds per primary tile at its best batch, one instance
    per_pixel_s: float | None  # the same per input pixel (for a dynamic whole-image call)
    whole_image_max_pixels: int
    queue_capacity_tiles: int

    @classmethod
    def parse(cls, m: dict[str, Any]) -> ModelInfo:
        tile = m.get("tile") or {}
        shapes = m.get("shapes") or {}
        tiles = [int(t) for t in shapes.get("tiles") or []] or [int(tile.get("input") or 0)]
        edge = max(tiles)
        rows = [r for r in m.get("cost_table") or [] if float(r.get("seconds") or 0) > 0 and r.get("batch")]
        at_edge = [float(r["seconds"]) / int(r["batch"]) for r in rows if r["height"] == r["width"] == edge]
        per_px = [float(r["seconds"]) / (int(r["height"]) * int(r["width"]) * int(r["batch"])) for r in rows]
        per_tile = min(at_edge) if at_edge else (min(per_px) * edge * edge if per_px else None)
        instances = max(1, int(m.get("instances") or 1))
        if per_tile is None and m.get("tiles_per_s"):  # a measured fleet rate, all instances together
            per_tile, instances = 1.0 / float(m["tiles_per_s"]), 1
        limits = m.get("limits") or {}
        return cls(
            native_scale=float(m.get("native_scale") or 4),
            tile=edge,
            overlap=int(tile.get("overlap") or 0),
            graph_scale=max(1, int(tile.get("graph_scale") or 1)),
            instances=instances,
            per_tile_s=per_tile,
            per_pixel_s=min(per_px) if per_px else None,
            whole_image_max_pixels=int(shapes.get("whole_image_max_pixels") or 0)
            if shapes.get("dynamic")
            else 0,
            queue_capacity_tiles=int(limits.get("queue_capacity_tiles") or 0),
        )


@dataclass(frozen=True)
class ServerInfo:
    """GET /v1/models, as the client uses it."""

    default: str | None
    models: dict[str, ModelInfo]
    max_output_pixels: int | None
    max_scale: float | None

    @classmethod
    def parse(cls, body: Any) -> ServerInfo | None:
        """None when the body is not what /v1/models returns (then the fixed rules apply)."""
        try:
            models = {str(m["name"]): ModelInfo.parse(m) for m in body["data"]}
            limits = body.get("limits") or {}
            return cls(
                default=body.get("default"),
                models=models,
                max_output_pixels=int(limits["max_output_pixels"])
                if limits.get("max_output_pixels")
                else None,
                max_scale=float(limits["max_scale"]) if limits.get("max_scale") else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def model(self, name: str | None) -> ModelInfo | None:
        return self.models.get(name or self.default or "")


@dataclass(frozen=True)
class Estimate:
    """The client's decision for one image."""

    use_job: bool
    read_timeout_s: float  # of a direct POST /upscale (before the deadline caps it)
    seconds: float | None  # the server's engine time for this image, when it could be estimated


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header (Pillow, if installed)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return int(w), int(h)
    except Exception:
        return None  # the server will say what is wrong with it


def output_size(
    w: int,
    h: int,
    opts: Options,
    native: float,
    max_pixels: int | None = None,
    max_scale: float | None = None,
) -> tuple[int, int]:
    """The result's (width, height) as the server decides it; with no size options, the largest scale
    up to the model's native one whose output fits the server's output cap."""
    if opts.width and opts.height:
        return int(opts.width), int(opts.height)  # the box: an upper bound whatever the fit
    if opts.width or opts.height:
        ow = opts.width or round(w * (opts.height or h) / h)
        oh = opts.height or round(h * (opts.width or w) / w)
        return int(ow), int(oh)
    s = opts.scale
    if s is None:
        s = min(native, max_scale or native)
        if max_pixels:
            s = min(s, math.sqrt(max_pixels / (w * h)))
    return max(1, math.floor(w * s)), max(1, math.floor(h * s))


def _axis_tiles(length: int, tile: int, overlap: int) -> int:
    """Tiles along one axis, as the server's tiling counts them (reflect margin of overlap/2)."""
    if length <= tile:
        return 1
    padded = length + 2 * (overlap // 2)
    return max(1, math.ceil((padded - overlap) / max(1, tile - overlap)))


def engine_seconds(m: ModelInfo, in_w: int, in_h: int, out_w: int, out_h: int) -> float | None:
    """The server's engine time for one image run alone: tiles of the primary shape, or one whole-image
    call where the model takes dynamic shapes and the image fits its budget (whichever is cheaper)."""
    g = m.graph_scale
    if g == 1:
        gw, gh = out_w, out_h
    elif out_w <= g * in_w and out_h <= g * in_h:
        gw, gh = in_w, in_h
    else:
        gw, gh = math.ceil(out_w / g), math.ceil(out_h / g)
    costs = []
    if m.per_tile_s is not None and m.tile > 0:
        tiles = _axis_tiles(gh, m.tile, m.overlap) * _axis_tiles(gw, m.tile, m.overlap)
        costs.append(tiles * m.per_tile_s / m.instances)
    if m.per_pixel_s is not None and 0 < gw * gh <= m.whole_image_max_pixels:
        costs.append(gw * gh * m.per_pixel_s)
    return min(costs) if costs else None


def estimate(data: bytes, opts: Options, use_job: bool | None, info: ServerInfo | None) -> Estimate:
    """Job or direct request, and the direct request's read timeout, from the server's numbers."""
    if use_job:
        return Estimate(True, FALLBACK_READ_TIMEOUT_S, None)
    m = info.model(opts.model) if info is not None else None
    size = image_size(data)
    seconds = wait = None
    px = None
    if size is not None:
        native = m.native_scale if m is not None else 4.0
        cap = info.max_output_pixels if info is not None else None
        out_w, out_h = output_size(*size, opts, native, cap, info.max_scale if info is not None else None)
        px = out_w * out_h
        if m is not None:
            seconds = engine_seconds(m, *size, out_w, out_h)
            if seconds is not None and m.per_tile_s is not None:
                wait = m.queue_capacity_tiles * m.per_tile_s / m.instances  # admission's longest queue
    if use_job is None:
        if seconds is not None:
            use_job = seconds > JOB_ABOVE_S
        else:
            use_job = len(data) > JOB_INPUT_BYTES if px is None else px > JOB_OUTPUT_PIXELS
    if seconds is None:
        read = FALLBACK_READ_TIMEOUT_S
    else:
        read = max(READ_TIMEOUT_MIN_S, READ_MARGIN * seconds + (wait or 0.0) + READ_SLACK_S)
    return Estimate(use_job, read, seconds)
