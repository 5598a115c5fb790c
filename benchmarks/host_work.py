"""Host work per output megapixel, by stage: what the service does around the engine call.

The stages a request goes through besides the engine (service/pixels/pipeline.py, batcher gather, stitcher):
prepare (resize + reflect-pad), gather (tiles copied into the engine's input batch), stitch (blend
outputs into the result), and for reference the PNG encode every system pays. Two planners on the
same sizes: the fixed primary tile (128² LR tiles, 16 px overlap, ×4 — the peer benchmark's cost
model) and the cost-aware planner (buckets 32/64 + whole image up to GENDR_WHOLE_IMAGE_MAX_PIXELS)
on the a + b·n cost table. The engine itself is nearest ×4 (np.repeat), timed apart: it is what a
whole-image peer pays too. Medians over repeats, interleaved.

    .venv/bin/python benchmarks/host_work.py [--repeats 5] [--json benchmarks/results/host_work.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from service.pixels.tiling import Stitcher, TilePlan, pad_image, plan_tiles
from service.scheduling.costs import CostTable
from service.scheduling.planner import EngineShapes, choose

TILE, OVERLAP, SCALE = 128, 16, 4
A, B = 0.015, 0.004
SIZES = {
    "tiny": [(64, 80), (96, 128), (128, 128)],
    "medium": [(200, 300), (300, 400), (400, 400)],
    "large": [(600, 800), (800, 1000), (1000, 1000)],
}


def photo(h: int, w: int, seed: int) -> np.ndarray:
    from skimage import data

    base = data.astronaut()
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(np.roll(img, seed, axis=1))


def cost_table() -> CostTable:
    t = {(s, s, b): A + B * b * s * s / TILE**2 for s in (32, 64, 128) for b in (1, 2, 4, 8)}
    t.update({(s, s, 1): A + B * s * s / TILE**2 for s in (128, 256)})
    return CostTable(t, (1, 2, 4, 8))


def run(img: np.ndarray, plan: TilePlan) -> dict[str, float]:
    th, tw = plan.shape
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    padded = pad_image(img, plan)
    out["prepare"] = time.perf_counter() - t0
    gather = engine = 0.0
    outs = []
    positions = list(plan.positions())
    for k in range(0, len(positions), 8):
        chunk = positions[k : k + 8]
        t0 = time.perf_counter()
        if plan.n_tiles == 1 and padded.shape[:2] == (th, tw):
            x = padded[None]  # the batcher passes a whole image as it is
        else:
            x = np.empty((len(chunk), th, tw, 3), np.uint8)
            for j, (_, y, xx) in enumerate(chunk):
                x[j] = padded[y : y + th, xx : xx + tw]
        t1 = time.perf_counter()
        y_ = x.repeat(SCALE, axis=1).repeat(SCALE, axis=2)
        t2 = time.perf_counter()
        gather += t1 - t0
        engine += t2 - t1
        outs.extend((i, y_[j]) for j, (i, _, _) in enumerate(chunk))
    t0 = time.perf_counter()
    st = Stitcher(plan)
    for i, o in outs:
        st.add(i, o)
    res = st.result()
    out["stitch"] = time.perf_counter() - t0
    out["gather"], out["engine"] = gather, engine
    t0 = time.perf_counter()
    buf = io.BytesIO()
    Image.fromarray(res).save(buf, format="PNG", compress_level=1)
    out["encode"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-call-pixels", type=int, default=1 << 20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    costs = cost_table()
    shapes = EngineShapes((32, 64, TILE), OVERLAP, SCALE, 8, True, args.max_call_pixels, 8)
    rows = []
    for cls, sizes in SIZES.items():
        acc: dict[str, dict[str, list[float]]] = {"fixed": {}, "planned": {}}
        mp = 0.0
        for k, (h, w) in enumerate(sizes):
            img = photo(h, w, k)
            mp += h * w * SCALE * SCALE / 1e6
            plans = {"fixed": plan_tiles(h, w, TILE, OVERLAP, SCALE), "planned": choose(h, w, shapes, costs)}
            per: dict[str, dict[str, list[float]]] = {n: {} for n in plans}
            for _ in range(args.repeats):
                for name, p in plans.items():  # interleaved
                    for stage, s in run(img, p).items():
                        per[name].setdefault(stage, []).append(s)
            for name in plans:
                for stage, v in per[name].items():
                    acc[name].setdefault(stage, []).append(statistics.median(v))
        for name, stages in acc.items():
            row = {"class": cls, "planner": name, **{s: 1e3 * sum(v) / mp for s, v in stages.items()}}
            row["host"] = row["prepare"] + row["gather"] + row["stitch"]
            rows.append(row)
    print("ms per output MP      prepare  gather  stitch  host(sum)  engine(np.repeat)  png encode")
    for r in rows:
        print(
            f"{r['class']:>7} {r['planner']:>8}   {r['prepare']:7.2f} {r['gather']:7.2f} {r['stitch']:7.2f}"
            f"  {r['host']:9.2f}  {r['engine']:17.2f}  {r['encode']:10.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "repeats": args.repeats}, indent=2))


if __name__ == "__main__":
    main()
