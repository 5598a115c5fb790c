"""Host work per output megapixel, end to end through HTTP, with the engine at a GPU's speed.

A real `gendr-serve` process on 127.0.0.1 runs the fake backend at a given engine speed in output MP/s —
derived from the model's FLOPs per output megapixel and a GPU's dense fp16 peak at a realistic share
(H100 SXM: 989 TFLOP/s × 30 %: Real-ESRGAN ×4 ≈ 2.24 TFLOP/MP → ≈132 MP/s, GenDR ≈ 12 TFLOP/MP →
≈25 MP/s; issue 27) — and serves mixed uploads (the peer benchmark's photos: 30 % tiny, 50 % medium,
20 % large, ×4, PNG and JPEG inputs) from a closed loop of clients, per output format. The engine's
output tiles are crops of a real Real-ESRGAN ×4 output (an encoder's speed depends on what it
encodes: nearest-neighbour blocks compress far better than a network's detail), cut by one copy,
as a GPU's device-to-host copy costs.

Per format it reports the server's CPU seconds per output MP (from /proc), output MP per host core,
the share of that CPU per stage (`gendr_host_cpu_seconds_total{stage}`: read, probe, decode, resize,
pad, gather, stitch, colour fix, encode, write; `other` = the rest: HTTP, scheduling, the fake's copy),
the engine's busy share here, and the figure that matters: host cores per GPU to keep the engine
≥ 90 % busy = 0.9 × engine MP/s × CPU s per MP.

    .venv/bin/python benchmarks/host_pipeline.py [--seconds 20] [--formats png,jpeg,webp,avif]
        [--models realesrgan,gendr] [--src DIR --label old] [--json benchmarks/results/host_pipeline.json]
    .venv/bin/python benchmarks/host_pipeline.py --quick --json /tmp/hp.json     # a smoke run (tests)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
from traffic import PoolImage, make_pool  # noqa: E402

H100_FP16_DENSE_TFLOPS = 989.4  # H100 SXM, dense (no sparsity)
GPU_SHARE = 0.30  # a realistic share of the peak for convolutions at these sizes (issue 27)
STAGES = ("read", "probe", "decode", "resize", "pad", "gather", "stitch", "colour_fix", "encode", "write")
TEXTURE = ROOT / ".cache" / "host_pipeline" / "sr_astronaut_x4.png"


@dataclass(frozen=True)
class Model:
    name: str
    kind: str  # manifest kind: "single" (×g graph) or "gendr" (graph scale 1, output resolution)
    tflop_per_mp: float  # engine FLOPs per output megapixel
    tile: int
    overlap: int
    graph_scale: int
    buckets: tuple[int, ...] = ()

    @property
    def engine_mp_s(self) -> float:
        return GPU_SHARE * H100_FP16_DENSE_TFLOPS / self.tflop_per_mp

    @property
    def per_tile_s(self) -> float:
        """Fake engine seconds per primary tile at that speed."""
        out = self.tile * self.graph_scale
        return out * out / 1e6 / self.engine_mp_s


MODELS = {
    # 330 GFLOP per 384² output tile (docs/benchmarks.md, counted); TensorRT: static 96 and 64 tiles
    "realesrgan": Model("realesrgan", "single", 330.4 / (384 * 384 / 1e6) / 1000, 96, 16, 4, (64,)),
    # GenDR's UNet + VAE at output resolution, ≈12 TFLOP per output MP (issue 27); 512 tiles, AdaIN
    "gendr": Model("gendr", "gendr", 12.0, 512, 64, 1),
}

LAUNCHER = r"""
import sys, time, numpy as np
from PIL import Image
import service.backends.fake as fake
texture = np.ascontiguousarray(np.asarray(Image.open(sys.argv.pop(1)).convert("RGB")))
th, tw = texture.shape[:2]

def infer(self, instance, batch):  # the a + b·n engine; its output cut from a real SR image, one copy
    n, h, w = batch.shape[:3]
    time.sleep(self.cost_s(n, h, w))
    s = self.scale
    out = np.empty((n, h * s, w * s, 3), np.uint8)
    for k in range(n):
        oy, ox = (int(batch[k, 0, 0, 0]) * 7919 + k * 104729) % th, (h * w + k * 6271) % tw
        y = 0
        while y < h * s:
            sy = (oy + y) % th
            dy = min(h * s - y, th - sy)
            x = 0
            while x < w * s:
                sx = (ox + x) % tw
                dx = min(w * s - x, tw - sx)
                out[k, y : y + dy, x : x + dx] = texture[sy : sy + dy, sx : sx + dx]
                x += dx
            y += dy
    return out

fake.FakeBackend.infer = infer
from service.cli import main
sys.exit(main())
"""


def write_repo(root: Path, m: Model) -> Path:
    """A manifest-only model repository for the fake backend."""
    sys.path.insert(0, str(ROOT))
    from service.manifest import Manifest, PipelineParams, TileGeometry, write_manifest

    man = Manifest(
        name=m.name,
        kind=m.kind,  # type: ignore[arg-type]
        native_scale=4,
        tile=TileGeometry(tile=m.tile, overlap=m.overlap, graph_scale=m.graph_scale, size_multiple=8),
        pipeline=PipelineParams() if m.kind == "gendr" else None,
    )
    write_manifest(root / m.name, man)
    return root


def texture() -> Path:
    """The engine's output content: a real Real-ESRGAN ×4 output when one was made, else a stand-in."""
    if TEXTURE.exists():
        return TEXTURE
    from skimage import data

    out = Path(tempfile.gettempdir()) / "host_pipeline_texture.png"
    if not out.exists():  # bicubic ×4 of a photo plus grain: compresses more like an SR output than blocks
        img = Image.fromarray(data.astronaut()).resize((2048, 2048), Image.Resampling.BICUBIC)
        grain = np.random.default_rng(0).normal(0, 3, (2048, 2048, 3))
        Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8)).save(out)
    return out


Upload = tuple[bytes, str, int, str]  # body, content type, output pixels, size class


def uploads(pool: list[PoolImage]) -> list[Upload]:
    """One upload per image: odd ones re-encoded as JPEG q90 (mixed inputs, as users send)."""
    out = []
    for i, im in enumerate(pool):
        if i % 2:
            buf = io.BytesIO()
            Image.open(io.BytesIO(im.png)).convert("RGB").save(buf, "JPEG", quality=90)
            out.append((buf.getvalue(), "image/jpeg", 16 * im.pixels, im.size_class))
        else:
            out.append((im.png, "image/png", 16 * im.pixels, im.size_class))
    return out


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(url: str) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("gendr_host_cpu_seconds_total{"):
            out[line.split('stage="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("gendr_compute_duration_seconds_sum"):
            out["engine_s"] = out.get("engine_s", 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def drive(url: str, bodies: list[Upload], fmt: str, clients: int, seconds: float) -> dict:
    """Closed loop: `clients` at once, each sends the next upload as soon as its last one answered; each
    upload draws its size class by the mix (30 % tiny, 50 % medium, 20 % large), then an image of it."""
    import httpx

    rng = random.Random(1)
    by_class = {c: [i for i, b in enumerate(bodies) if b[3] == c] for c in ("tiny", "medium", "large")}
    mix = [(c, p) for c, p in (("tiny", 0.3), ("medium", 0.5), ("large", 0.2)) if by_class[c]]
    classes = rng.choices([c for c, _ in mix], [p for _, p in mix], k=100_000)
    order = [rng.choice(by_class[c]) for c in classes]
    done = {"ok": 0, "err": 0, "mp": 0.0}
    end = time.monotonic() + seconds
    k = iter(order)

    async def one(client: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            body, ctype, px, _ = bodies[next(k)]
            r = await client.post(
                f"{url}/upscale", files={"image": ("in", body, ctype)}, data={"format": fmt}, timeout=300
            )
            if r.status_code == 200:
                done["ok"] += 1
                done["mp"] += px / 1e6
            else:
                done["err"] += 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(one(client) for _ in range(clients)))
    return done


def start(src: Path, repo: Path, m: Model, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENDR_")}
    env.update(
        {
            "PYTHONPATH": str(src),
            "GENDR_MODEL_REPOSITORY": str(repo),
            "GENDR_BACKEND": "fake",
            "GENDR_FAKE_PER_TILE_S": f"{m.per_tile_s:.9f}",
            "GENDR_FAKE_TILES": ",".join(map(str, m.buckets)),
            "GENDR_MAX_BATCH": "8",
            "GENDR_QUEUE_CAPACITY_TILES": "100000",
            "GENDR_IMAGE_WORKERS": str(os.cpu_count() or 2),
            "GENDR_MAX_BODY_BYTES": str(64 << 20),
        }
    )
    cmd = [sys.executable, "-c", LAUNCHER, str(texture()), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import httpx

    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("not ready: " + log.read_text()[-3000:])


def cell(
    src: Path, m: Model, fmt: str, bodies: list[Upload], seconds: float, clients: int, work: Path
) -> dict:
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    repo = write_repo(work / f"repo-{m.name}", m)
    log = work / f"{m.name}-{fmt}.log"
    proc = start(src, repo, m, port, log)
    try:
        wait_ready(url, proc, log)
        asyncio.run(drive(url, bodies, fmt, clients, min(3.0, seconds / 4)))  # warm: pools, caches
        m0, c0, t0 = metrics(url), proc_cpu(proc.pid), time.monotonic()
        done = asyncio.run(drive(url, bodies, fmt, clients, seconds))
        m1, c1, wall = metrics(url), proc_cpu(proc.pid), time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    cpu = c1 - c0
    mp = done["mp"]
    stages = {s: (m1.get(s, 0.0) - m0.get(s, 0.0)) for s in STAGES if s in m1}
    row = {
        "model": m.name,
        "format": fmt,
        "requests": done["ok"],
        "errors": done["err"],
        "output_mp": round(mp, 2),
        "wall_s": round(wall, 2),
        "mp_s": round(mp / wall, 2),
        "cpu_s_per_mp": round(cpu / mp, 5) if mp else None,
        "mp_s_per_core": round(mp / cpu, 2) if cpu else None,
        "engine_busy": round((m1.get("engine_s", 0) - m0.get("engine_s", 0)) / wall, 3),
        "engine_mp_s": round(m.engine_mp_s, 1),
    }
    if mp:
        row["cores_per_gpu"] = round(0.9 * m.engine_mp_s * cpu / mp, 2)
    if stages and cpu:
        row["stage_ms_per_mp"] = {s: round(1e3 * v / mp, 2) for s, v in stages.items()}
        row["stage_ms_per_mp"]["other"] = round(1e3 * (cpu - sum(stages.values())) / mp, 2)
        total = 1e3 * cpu / mp
        row["stage_share"] = {s: round(v / total, 3) for s, v in row["stage_ms_per_mp"].items()}
    return row


def codecs(repeats: int = 3) -> list[dict]:
    """The encoder levers on the engine's output content (a real SR image): thread CPU per MP (so a
    busy machine does not count), bytes, and the GIL: two encodes on two threads against one after the
    other (≈ 2×: the GIL is released; ≈ 1×: held; meaningful only with two idle cores)."""
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    import imagecodecs
    from isal import isal_zlib

    sys.path.insert(0, str(ROOT))
    from service.http import fastencode

    img = np.ascontiguousarray(np.asarray(Image.open(texture()).convert("RGB")))
    mp = img.shape[0] * img.shape[1] / 1e6
    rows = np.empty((img.shape[0], img.shape[1] * 3 + 1), np.uint8)
    rows[:, 0], rows[0, 1:] = 2, img[0].ravel()
    np.subtract(
        img[1:].reshape(img.shape[0] - 1, -1), img[:-1].reshape(img.shape[0] - 1, -1), out=rows[1:, 1:]
    )

    def pil(fmt: str, **kw: object):
        def run() -> bytes:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=fmt, **kw)
            return buf.getvalue()

        return run

    cases = {
        "PNG Pillow level 1": pil("PNG", compress_level=1),
        "PNG Pillow level 3 (before)": pil("PNG", compress_level=3),
        "PNG Pillow level 6": pil("PNG", compress_level=6),
        "PNG Up + zlib 1 (bytes only)": lambda: zlib.compress(rows, 1),
        "PNG Up + ISA-L 1 (bytes only)": lambda: isal_zlib.compress(rows, 1),
        "PNG fastencode level 1-3 (after)": lambda: fastencode.png(img, level=3),
        "PNG fastencode level 6": lambda: fastencode.png(img, level=6),
        "JPEG q90 4:4:4 Pillow (before)": pil("JPEG", quality=90, subsampling=0),
        "JPEG q90 4:4:4 imagecodecs (after)": lambda: fastencode.jpeg(img, 90, subsampling="444"),
        "WebP q90 method 2 Pillow (before)": pil("WEBP", quality=90, method=2),
        "WebP q90 method 0 Pillow": pil("WEBP", quality=90, method=0),
        "WebP q90 method 2 imagecodecs (after)": lambda: fastencode.webp(img, 90, method=2),
        "WebP q90 method 0 imagecodecs": lambda: fastencode.webp(img, 90, method=0),
        "AVIF q90 speed 8 Pillow": pil("AVIF", quality=90, speed=8),
    }
    del imagecodecs
    out = []
    for name, fn in cases.items():
        fn()
        c0 = time.thread_time()
        for _ in range(repeats):
            data = fn()
        cpu = (time.thread_time() - c0) / repeats
        w0 = time.perf_counter()
        fn()
        fn()
        one = time.perf_counter() - w0
        with ThreadPoolExecutor(2) as ex:  # the GIL: two encodes at once take half the time only without it
            w0 = time.perf_counter()
            list(ex.map(lambda f: f(), [fn, fn]))
            two = time.perf_counter() - w0
        row = {"codec": name, "ms_per_mp_cpu": round(1e3 * cpu / mp, 1), "mb": round(len(data) / 1e6, 3)}
        row["two_threads_speedup"] = round(one / two, 2)  # needs two idle cores to mean anything
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--formats", default="png,jpeg,webp,avif")
    ap.add_argument("--models", default="realesrgan,gendr")
    ap.add_argument("--src", type=Path, default=ROOT, help="serve this source tree (e.g. a git archive)")
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--per-class", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="2 s per cell, PNG only, 3 images per class")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--codecs", action="store_true", help="only the encoder table (thread CPU, size, GIL)")
    args = ap.parse_args()
    if args.codecs:
        table = codecs()
        if args.json:
            args.json.write_text(json.dumps({"texture": texture().name, "codecs": table}, indent=2))
        return
    if args.quick:
        args.seconds, args.formats, args.per_class, args.clients = 2.0, "png", 3, 2
    pool = make_pool(args.per_class, seed=0)
    if args.quick:  # small images only: a smoke run
        pool = [im for im in pool if im.size_class != "large"]
    bodies = uploads(pool)
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for fmt in args.formats.split(","):
                row = cell(args.src, MODELS[name], fmt, bodies, args.seconds, args.clients, Path(tmp))
                row["label"] = args.label
                rows.append(row)
                print(json.dumps(row), flush=True)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), "?")
    report = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_before": load0,
        "load_avg_after": os.getloadavg()[0],
        "texture": str(texture().name),
        "seconds": args.seconds,
        "clients": args.clients,
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
