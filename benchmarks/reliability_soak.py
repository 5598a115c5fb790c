"""Long part of the reliability suite (the fast part is tests/reliability, in pytest).

Against real `gendr-serve` processes on 127.0.0.1 only, with the fake backend (no model, so the
figures measure the service, not an engine):

- soak: N mixed requests (small and large decodes, every format, multipart, options, client errors)
  from 4 threads; RSS every 500 requests. Pass: RSS(N) − RSS(500) ≤ 50 MB.
- fuzz: schemathesis over the live OpenAPI document, mutated images (bit flips, truncation,
  patched headers) and malformed HTTP. Pass: no unexpected 5xx, no hang.
- overload: 3× the engine's capacity; time until the first 503 and the 503s' latency.
- drain: SIGTERM with admitted requests, several rounds. Pass: 0 lost.
- repositories: every tampering of tests/reliability/test_repository.py. Pass: all refused.

    python benchmarks/reliability_soak.py [--requests 10000] [--fuzz 300] [--out FILE.json]

Bounded: every request has a timeout, and the whole run stops after --max-minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import ROOT, machine

sys.path.insert(0, str(ROOT / "tests" / "reliability"))
from reliability_helpers import (
    DEPLOYED_ALLOCATOR,
    encode,
    jpeg_with_size,
    noise,
    raw_exchange,
    start_server,
    status_of,
    write_fake_repo,
)

TIMEOUT_S = 30.0  # a request slower than this is a hang
EXPECTED_5XX = {503, 504}
PNG = {"content-type": "image/png"}


def _image(rng: random.Random, big: bool) -> bytes:
    fmt = rng.choice(["PNG", "JPEG", "WEBP"])
    lo, hi = (1200, 2000) if big else (8, 64)
    h, w = rng.randint(lo, hi), rng.randint(lo, hi)
    arr = noise(h, w, seed=rng.randrange(1 << 30))
    if big:  # coarse content: compresses like a photo, decodes like a big one
        arr = (arr // 64 * 64).astype(np.uint8)
    return encode(arr, fmt, **({"quality": 85} if fmt != "PNG" else {}))


class Bodies:
    """Encoded once, reused: the client's encoding must not be what the soak measures."""

    def __init__(self, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.small = [_image(rng, False) for _ in range(60)]
        self.big = [_image(rng, True) for _ in range(6)]


def _mixed_request(rng: random.Random, bodies: Bodies) -> dict[str, Any]:
    kind = rng.choices(["small", "big", "multipart", "error"], weights=[60, 5, 15, 20])[0]
    if kind == "error":
        body = rng.choice(bodies.small)
        case = rng.choice(["truncated", "garbage", "bad_option", "scale", "corrupt_header", "empty"])
        params: dict[str, Any] = {"scale": 2}
        if case == "truncated":
            body = body[: len(body) // 2]
        elif case == "garbage":
            body = rng.randbytes(rng.randint(1, 4096))
        elif case == "bad_option":
            params = {"format": "gif"}
        elif case == "scale":
            params = {"scale": 9}
        elif case == "corrupt_header":
            body = jpeg_with_size(4000, 4000)
        else:
            body = b""
        return {"content": body, "params": params}
    body = rng.choice(bodies.big if kind == "big" else bodies.small)
    params = {"width": 128} if kind == "big" else {"scale": rng.choice([1, 1.5, 2])}
    params["format"] = rng.choice(["png", "jpeg", "webp"])
    if kind == "multipart":
        return {"files": {"image": ("x", body, "application/octet-stream")}, "data": params}
    return {"content": body, "params": params}


class Tally:
    def __init__(self) -> None:
        self.status: Counter[str] = Counter()
        self.unexpected_5xx: list[str] = []
        self.hangs = 0
        self.lock = threading.Lock()

    def add(self, status: int | str, what: str) -> None:
        with self.lock:
            self.status[str(status)] += 1
            if isinstance(status, int) and status >= 500 and status not in EXPECTED_5XX:
                self.unexpected_5xx.append(f"{status} {what}")
            if status == "hang":
                self.hangs += 1


def soak(
    repo: Path, logdir: Path, n: int, allocator: dict[str, str | None], bodies: Bodies
) -> dict[str, Any]:
    srv = start_server(
        repo,
        logdir / f"soak-{len(allocator)}.log",
        max_output_pixels=1 << 20,
        queue_capacity_tiles=4096,
        env_overrides=allocator,
    )
    tally, done = Tally(), [0]
    every = 500 if n >= 5000 else max(1, n // 10)
    rss = {0: srv.rss_bytes()}
    t0 = time.monotonic()

    def worker(seed: int, count: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT_S) as c:
            for _ in range(count):
                req = _mixed_request(rng, bodies)
                try:
                    r = c.post("/upscale", **req)
                    tally.add(r.status_code, str(req.get("params") or req.get("data")))
                except httpx.TimeoutException:
                    tally.add("hang", "")
                except httpx.TransportError as e:
                    tally.add("transport", repr(e))
                with tally.lock:
                    done[0] += 1
                    if done[0] % every == 0:
                        rss[done[0]] = srv.rss_bytes()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: worker(i, n // 4), range(4)))
    seconds = time.monotonic() - t0
    srv.stop()
    first, last = rss[every], rss[max(rss)]
    return {
        "allocator_env": {k: v for k, v in allocator.items() if v is not None} or "glibc defaults",
        "requests": done[0],
        "seconds": round(seconds, 1),
        "status": dict(tally.status),
        "unexpected_5xx": tally.unexpected_5xx[:20],
        "hangs": tally.hangs,
        "rss_mb": {k: round(v / 2**20, 1) for k, v in sorted(rss.items())},
        "rss_growth_mb_first_sample_to_end": round((last - first) / 2**20, 1),
    }


def fuzz(repo: Path, logdir: Path, per_operation: int, mutations: int) -> dict[str, Any]:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from test_protocol import MALFORMED
    from test_schema_fuzz import check_response

    srv = start_server(
        repo, logdir / "fuzz.log", max_output_pixels=1 << 18, max_body_bytes=1 << 20, max_header_bytes=8192
    )
    groups: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    for result in schema.get_all_operations():
        op = result.ok()
        g = groups.setdefault(f"schemathesis {op.label}", {"cases": 0, "unexpected_5xx": 0, "hangs": 0})

        def run_op(strategy: Any, label: str, g: dict[str, int] = g) -> None:
            @given(case=strategy)
            @settings(max_examples=per_operation, deadline=None, suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                g["cases"] += 1
                try:
                    resp = case.call(timeout=TIMEOUT_S)
                except Exception as e:
                    g["hangs" if "imeout" in type(e).__name__ else "unexpected_5xx"] += 1
                    failures.append(f"{label}: {e!r}"[:300])
                    return
                try:
                    check_response(resp)
                except AssertionError as e:
                    g["unexpected_5xx"] += 1
                    failures.append(f"{label}: {e}"[:300])

            run()

        run_op(op.as_strategy(), op.label)
    # mutated images: flips, truncations, patched sizes
    rng = random.Random(1)
    g = groups.setdefault("mutated images", {"cases": 0, "unexpected_5xx": 0, "hangs": 0})
    seeds = [_image(random.Random(i), False) for i in range(20)]
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT_S) as c:
        for _ in range(mutations):
            b = bytearray(rng.choice(seeds))
            op = rng.choice(["flip", "truncate", "splice", "jpeg_size"])
            if op == "flip":
                for _ in range(rng.randint(1, 16)):
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif op == "truncate":
                b = b[: rng.randrange(1, len(b))]
            elif op == "splice":
                i = rng.randrange(len(b))
                b[i:i] = rng.randbytes(rng.randint(1, 64))
            else:
                b = bytearray(jpeg_with_size(rng.randint(1, 60000), rng.randint(1, 60000)))
            g["cases"] += 1
            try:
                r = c.post("/upscale?scale=2", content=bytes(b))
                if r.status_code >= 500 and r.status_code not in EXPECTED_5XX:
                    g["unexpected_5xx"] += 1
                    failures.append(f"mutated {op}: {r.status_code} {r.text[:200]}")
            except httpx.TimeoutException:
                g["hangs"] += 1
    g = groups.setdefault("malformed HTTP", {"cases": 0, "unexpected_5xx": 0, "hangs": 0})
    for _ in range(5):
        for name, data, status, _code in MALFORMED:
            g["cases"] += 1
            resp, closed = raw_exchange(srv.port, data, timeout=TIMEOUT_S)
            if not closed:
                g["hangs"] += 1
            elif status_of(resp) != status:
                g["unexpected_5xx"] += status_of(resp) >= 500
                failures.append(f"{name}: {resp[:120]!r}")
    srv.stop()
    return {"groups": groups, "failures": failures[:20]}


def overload(repo: Path, logdir: Path) -> dict[str, Any]:
    """Engine: 1 instance, batch 1, 20 ms per tile → 50 tiles/s; queue of 20 tiles. Offered: 150 req/s."""
    srv = start_server(
        repo, logdir / "overload.log", delay_s=0.02, max_batch=1, queue_capacity_tiles=20, retry_after_s=1
    )
    body = encode(noise(16, 16))  # one tile
    results: list[tuple[float, int, float, bool]] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(client: httpx.Client, at: float) -> None:
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        s = time.monotonic()
        r = client.post(f"{srv.url}/upscale?scale=2", content=body, headers=PNG)
        with lock:
            results.append((s - t0, r.status_code, time.monotonic() - s, "retry-after" in r.headers))

    with (
        httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64)) as client,
        ThreadPoolExecutor(64) as pool,
    ):
        list(pool.map(lambda at: one(client, at), [i / 150 for i in range(600)]))  # 4 s at 3× capacity
    srv.stop()
    rejected = sorted((t, lat, ra) for t, st, lat, ra in results if st == 503)
    lat = sorted(lat for _, lat, _ in rejected)
    return {
        "capacity_tiles_per_s": 50,
        "offered_per_s": 150,
        "requests": len(results),
        "status": dict(Counter(str(st) for _, st, _, _ in results)),
        "first_503_after_s": round(rejected[0][0], 3) if rejected else None,
        "latency_503_ms_p50": round(1000 * lat[len(lat) // 2], 1) if lat else None,
        "latency_503_ms_p99": round(1000 * lat[int(len(lat) * 0.99)], 1) if lat else None,
        "all_503_have_retry_after": all(ra for _, _, ra in rejected),
    }


def drain(repo: Path, logdir: Path, rounds: int) -> dict[str, Any]:
    admitted = lost = 0
    for k in range(rounds):
        srv = start_server(repo, logdir / f"drain{k}.log", delay_s=0.2, max_batch=1, drain_timeout_s=30)
        out: list[int] = []
        n = 8

        def call(out: list[int] = out, url: str = srv.url) -> None:
            try:
                r = httpx.post(f"{url}/upscale?scale=2", content=encode(noise(16, 16)), timeout=60)
                out.append(r.status_code)
            except httpx.TransportError:
                out.append(0)

        threads = [threading.Thread(target=call) for _ in range(n)]
        for t in threads:
            t.start()
        srv.wait_metric("gendr_queue_depth_requests", lambda v, n=n: v == n)
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        srv.proc.wait(40)
        admitted += n
        lost += sum(1 for s in out if s != 200)
    return {"rounds": rounds, "admitted": admitted, "lost": lost}


def repositories(tmp: Path) -> dict[str, Any]:
    from test_repository import TAMPERED, _repo

    from service.manifest import ManifestError, read_manifest

    refused = []
    for i, (name, tamper) in enumerate(TAMPERED.items()):
        try:
            read_manifest(_repo(tmp / f"t{i}", tamper), verify=True)
        except ManifestError:
            refused.append(name)
    served = sorted(set(TAMPERED) - set(refused))
    return {"tampered": len(TAMPERED), "refused": len(refused), "served": served}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--fuzz", type=int, default=300, help="schemathesis cases per operation")
    ap.add_argument("--mutations", type=int, default=2000)
    ap.add_argument("--drain-rounds", type=int, default=5)
    ap.add_argument("--compare-default-malloc", action="store_true", help="also soak with glibc's defaults")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reliability_soak.json")
    ap.add_argument("--max-minutes", type=float, default=30)
    args = ap.parse_args()
    limit = threading.Timer(args.max_minutes * 60, _time_limit)
    limit.daemon = True
    limit.start()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        repo = write_fake_repo(tmp / "models")
        report: dict[str, Any] = {"machine": machine()}
        report["repositories"] = repositories(tmp / "repos")
        report["drain"] = drain(repo, tmp, args.drain_rounds)
        report["overload"] = overload(repo, tmp)
        report["fuzz"] = fuzz(repo, tmp, args.fuzz, args.mutations)
        bodies = Bodies()
        report["soak"] = [soak(repo, tmp, args.requests, dict(DEPLOYED_ALLOCATOR), bodies)]
        if args.compare_default_malloc:
            glibc = {k: None for k in DEPLOYED_ALLOCATOR}
            report["soak"].append(soak(repo, tmp, args.requests, glibc, bodies))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = (
        report["drain"]["lost"] == 0
        and report["repositories"]["refused"] == report["repositories"]["tampered"]
        and all(g["unexpected_5xx"] == 0 and g["hangs"] == 0 for g in report["fuzz"]["groups"].values())
        and report["soak"][0]["rss_growth_mb_first_sample_to_end"] <= 50
        and not report["soak"][0]["unexpected_5xx"]
        and report["soak"][0]["hangs"] == 0
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _time_limit() -> None:
    print("reliability_soak: time limit reached", file=sys.stderr)
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
