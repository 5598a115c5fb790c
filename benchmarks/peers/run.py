"""gendr-serve vs. LitServe, Ray Serve, Triton (PyTriton) and a hand-written FastAPI app, one command.

    .venv/bin/python benchmarks/peers/run.py [--quick] [--out benchmarks/results/peers.json]
        [--systems ours,litserve,ray,pytriton,fastapi] [--engines cost,onnx]

Creates the peers' venvs (PyPI) when missing, builds both engines' models, measures gendr-serve's
capacity on each engine (closed loop), then sends the same open-loop Poisson traffic at 50/90/150 %
of it to every system, one system at a time, systems interleaved per load level. Writes the JSON
after every cell, then a markdown table and a p95-vs-throughput plot. README.md beside this file
says what every figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import engines  # noqa: E402
import prepare  # noqa: E402
import procmon  # noqa: E402
import report  # noqa: E402
import stats  # noqa: E402
import systems  # noqa: E402
import traffic  # noqa: E402
from client import Client  # noqa: E402

WORK = HERE / ".work"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "peers.json"
DEFAULT_PLOT = ROOT / "docs" / "peers-p95-vs-throughput.png"
STARTUP_EST_S = {"ours": 6, "litserve": 5, "ray": 20, "pytriton": 6, "fastapi": 3}
READY_LIMIT_S = 180.0
POOL_PER_CLASS = 12
#: Seconds of arrivals per cell: the ONNX engine serves ~1 req/s here, so its cells run longer.
CELL_S = {"cost": 20.0, "onnx": 30.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one load (90 %%), ours + FastAPI, 10 s cells")
    p.add_argument(
        "--out", type=Path, default=None, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})"
    )
    p.add_argument("--plot", type=Path, default=None, help="plot path (default docs/… or beside --out)")
    p.add_argument("--systems", default=None, help="comma-separated: ours,litserve,ray,pytriton,fastapi")
    p.add_argument("--engines", default="cost,onnx", help="comma-separated: cost,onnx")
    p.add_argument("--loads", default=None, help="fractions of our capacity (default 0.5,0.9,1.5)")
    p.add_argument(
        "--cell-s", type=float, default=None, help="seconds of arrivals per cell (default: cost 20, onnx 30)"
    )
    p.add_argument("--capacity-s", type=float, default=None, help="closed-loop capacity run (default 15)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout (a failure)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    q = a.quick
    a.systems = (a.systems or ("ours,fastapi" if q else "ours,litserve,ray,pytriton,fastapi")).split(",")
    a.engines = a.engines.split(",")
    a.loads = [float(x) for x in (a.loads or ("0.9" if q else "0.5,0.9,1.5")).split(",")]
    a.cell_s = {e: a.cell_s or (10.0 if q else CELL_S[e]) for e in ("cost", "onnx")}
    a.capacity_s = a.capacity_s or (6.0 if q else 15.0)
    default_out = WORK / "quick.json" if q else DEFAULT_OUT
    a.out = a.out or default_out
    a.plot = a.plot or (DEFAULT_PLOT if a.out == DEFAULT_OUT else a.out.with_suffix(".png"))
    return a


def planned_s(a: argparse.Namespace) -> float:
    """Rough wall time: startups, warm-ups, cells, drains of overloaded cells, capacity runs."""
    total = 0.0
    for e in a.engines:
        cell_s = a.cell_s[e]
        per_round = sum(STARTUP_EST_S.get(k, 10) + 5 + cell_s + 4 for k in a.systems)
        drains = sum(min(a.timeout_s, cell_s * (load - 1) + 5) if load > 1 else 3 for load in a.loads)
        total += len(a.loads) * per_round + drains * len(a.systems)
        total += STARTUP_EST_S["ours"] + 5 + a.capacity_s + 4
    return total


def free_port(n: int = 3, start: int = 18400) -> int:
    """First port p ≥ start with p … p+n−1 all free on 127.0.0.1."""
    for base in range(start, 30000, 10):
        try:
            socks = []
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port")


def engine_env(system: systems.System, engine: str, prep: dict[str, Any]) -> dict[str, str]:
    lock = WORK / "locks" / f"{engine}-{system.key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    if system.key != "ours":
        env = {"PEER_ENGINE": engine, "PEER_LOCK": str(lock)}
        if engine == "onnx":
            env["PEER_ONNX"] = str(prep["peer_onnx"])
        return env
    from service.settings import Settings  # the checkout's settings: use shape buckets when it has them

    env = {
        # whole images on the dynamic graph up to the largest image of the traffic (1000² input): the
        # peers run every image whole too; per-call memory of these two engines at 1 MP is small
        "GENDR_WHOLE_IMAGE_MAX_PIXELS": os.environ.get("PEERS_WHOLE_IMAGE_MAX_PIXELS", str(1 << 20)),
        "GENDR_INSTANCES_PER_DEVICE": "1",
        "GENDR_PNG_COMPRESS_LEVEL": str(engines.PNG_LEVEL),
        "GENDR_LOG_LEVEL": "warning",
    }
    if engine == "cost":
        env.update(
            GENDR_MODEL_REPOSITORY=str(prep["fake_repo"]),
            GENDR_BACKEND="fake",
            GENDR_FAKE_DELAY_S=str(engines.A_S),
            GENDR_FAKE_PER_TILE_S=str(engines.B_S),
        )
        if "fake_tiles" in Settings.model_fields:
            env["GENDR_FAKE_TILES"] = "32,64"
        if "fake_dynamic" in Settings.model_fields:
            env["GENDR_FAKE_DYNAMIC"] = "true"
    else:
        env.update(GENDR_MODEL_REPOSITORY=str(prep["onnx_repo"]), GENDR_BACKEND="onnxruntime-cpu")
    return env


async def _ready(run: systems.Running, probe: traffic.PoolImage, timeout_s: float) -> float:
    """Seconds until the server answers a real request correctly (every framework's own readiness differs)."""
    t0 = time.monotonic()
    c = Client(run.base, run.system.client_kind, timeout_s)
    try:
        while time.monotonic() - t0 < READY_LIMIT_S:
            if not run.alive():
                raise RuntimeError(f"exited with {run.proc.returncode}")
            if (await c.one(probe, time.monotonic())).outcome == "ok":
                return time.monotonic() - t0
            await asyncio.sleep(0.5)
        raise RuntimeError(f"not ready after {READY_LIMIT_S:.0f} s")
    finally:
        await c.close()


def launch(
    s: systems.System,
    engine: str,
    prep: dict[str, Any],
    pool: list[traffic.PoolImage],
    tag: str,
    timeout_s: float,
) -> tuple[systems.Running, float]:
    """Start, wait for the first correct answer, warm up on one image of every class."""
    log = WORK / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    run = systems.start(s, free_port(), engine_env(s, engine, prep), log)
    try:
        startup = asyncio.run(_ready(run, pool[0], timeout_s))

        async def warm() -> None:
            c = Client(run.base, s.client_kind, timeout_s)
            for cls in traffic.CLASS_NAMES:
                await c.one(next(im for im in pool if im.size_class == cls), time.monotonic())
            await c.close()

        asyncio.run(warm())
    except BaseException:
        run.stop()
        raise
    return run, startup


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def capacity(engine: str, prep: dict[str, Any], pool: list[traffic.PoolImage], a: argparse.Namespace) -> dict:
    """gendr-serve's throughput with 6 requests always outstanding, as output MP/s and req/s of the mix."""
    ours = next(s for s in systems.all_systems(len(os.sched_getaffinity(0))) if s.key == "ours")
    run, _ = launch(ours, engine, prep, pool, f"{engine}-capacity", a.timeout_s)
    try:
        order = [x.image for x in traffic.arrivals(pool, 50.0, 200.0, seed=a.seed + 100)]
        c = Client(run.base, "multipart", a.timeout_s)

        async def go() -> tuple[float, int, int]:
            try:
                return await c.closed_loop(pool, order, concurrency=6, duration_s=a.capacity_s)
            finally:
                await c.close()

        mp_s, sent, ok = asyncio.run(go())
    finally:
        run.stop()
    if ok == 0:
        raise RuntimeError(f"gendr-serve answered none of {sent} capacity requests; see {run.log}")
    mean_mp = traffic.mean_output_mp(pool)
    return {
        "output_mp_s": round(mp_s, 4),
        "req_s": round(mp_s / mean_mp, 3),
        "sent": sent,
        "ok": ok,
        "mean_output_mp": round(mean_mp, 4),
        "concurrency": 6,
        "duration_s": a.capacity_s,
    }


def cell(
    s: systems.System,
    engine: str,
    load: float,
    rate: float,
    prep: dict[str, Any],
    pool: list[traffic.PoolImage],
    a: argparse.Namespace,
) -> dict[str, Any]:
    """One system at one load: fresh start, warm-up, the open-loop plan, /proc accounting, stop."""
    row: dict[str, Any] = {"system": s.name, "key": s.key, "engine": engine, "load": load}
    row.update(offered_req_s=round(rate, 3), workers=s.workers, cell_s=a.cell_s[engine])
    plan = traffic.arrivals(pool, rate, a.cell_s[engine], seed=a.seed + int(load * 1000))
    run, startup = launch(s, engine, prep, pool, f"{engine}-{s.key}-{int(load * 100)}", a.timeout_s)
    row["startup_s"] = round(startup, 1)
    try:
        row["load_avg_before"] = round(os.getloadavg()[0], 2)
        c = Client(run.base, s.client_kind, a.timeout_s)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        with procmon.Monitor(run.proc.pid) as mon:

            async def go() -> tuple[list[stats.Record], float]:
                try:
                    return await c.run(pool, plan)
                finally:
                    await c.close()

            records, wall = asyncio.run(go())
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        row["load_avg_after"] = round(os.getloadavg()[0], 2)
    finally:
        run.stop()
    row.update(stats.summarise(records, wall, traffic.CLASS_NAMES))
    row["server_cpu_s"] = round(mon.cpu_s, 2)
    row["cpu_s_per_mp"] = round(mon.cpu_s / row["output_mp"], 3) if row["output_mp"] else float("nan")
    row["peak_rss_mb"] = round(mon.peak_rss / 1e6, 1)
    row["client_cpu_s"] = round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2)
    return row


def progress(engine: str, row: dict[str, Any]) -> str:
    if "error" in row:
        return f"[{engine}] {row['system']} FAILED: {row['error']}\n{row['log_tail']}"
    return (
        f"[{engine} {row['load']:.0%}] {row['system']:18s} {row['output_mp_s']:.3f} MP/s  "
        f"p95 {row['p95_s']:.2f} s  shed {row['shed_rate']:.0%} t/o {row['timeout_rate']:.0%} "
        f"err {row['error_rate']:.0%}  cpu {row['cpu_s_per_mp']:.2f} s/MP  rss {row['peak_rss_mb']:.0f} MB  "
        f"load {row['load_avg_before']}"
    )


def venvs(chosen: list[systems.System]) -> dict[str, dict[str, object]]:
    """Create missing peer venvs; install time (when made by this harness) and size of each."""
    path = WORK / "venvs.json"
    info: dict[str, dict[str, object]] = json.loads(path.read_text()) if path.is_file() else {}
    for s in chosen:
        made = systems.ensure_venv(s, WORK / f"install-{s.key}.log")
        if made is not None:
            info[s.key] = made
            print(f"installed {s.name}: {made}", flush=True)
        if s.key != "ours":
            info.setdefault(s.key, {})["size_mb"] = systems.dir_mb(s.venv)
    path.write_text(json.dumps(info, indent=1))
    return info


def header(
    a: argparse.Namespace,
    argv: list[str],
    prep: dict[str, Any],
    chosen: list[systems.System],
    venv_info: dict,
) -> dict[str, Any]:
    import _common

    config = {
        "command": "benchmarks/peers/run.py " + " ".join(argv),
        "cell_s": a.cell_s,
        "timeout_s": a.timeout_s,
        "seed": a.seed,
        "loads": a.loads,
        "capacity_s": a.capacity_s,
        "pool_per_class": POOL_PER_CLASS,
        "mix": traffic.SIZE_CLASSES,
        "cost_model": {"a_s": engines.A_S, "b_s": engines.B_S, "tile": engines.COST_TILE},
        "onnx_net": {"arch": "SRVGGNetCompact", "num_feat": prepare.NUM_FEAT, "num_conv": prepare.NUM_CONV},
        "gendr_build_flags": prep.get("build_flags"),
        "png_compress_level": engines.PNG_LEVEL,
    }
    described = {
        s.name: {
            "key": s.key,
            "workers": s.workers,
            "workers_note": s.workers_note,
            "batching": s.batching,
            "client": s.client_kind,
            **venv_info.get(s.key, {}),
        }
        for s in chosen
    }
    return {"machine": _common.machine(), "config": config, "systems": described, "capacity": {}, "cells": []}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    chosen = [s for s in systems.all_systems(len(os.sched_getaffinity(0))) if s.key in a.systems]
    unknown = set(a.systems) - {s.key for s in chosen}
    if unknown or not set(a.engines) <= {"cost", "onnx"}:
        print(f"unknown systems {sorted(unknown)} or engines {a.engines}", file=sys.stderr)
        return 2
    n_cells = len(chosen) * len(a.engines) * len(a.loads)
    print(
        f"plan: {n_cells} cells ({', '.join(s.name for s in chosen)} × {a.engines} × loads {a.loads}), "
        f"cells of {a.cell_s} s; planned ≈ {planned_s(a) / 60:.1f} min plus first-time venv installs",
        flush=True,
    )
    WORK.mkdir(parents=True, exist_ok=True)
    venv_info = venvs(chosen)
    prep = prepare.prepare(a.engines)
    pool = traffic.make_pool(POOL_PER_CLASS, seed=a.seed)
    result = header(a, argv, prep, chosen, venv_info)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    for engine in a.engines:
        cap = capacity(engine, prep, pool, a)
        result["capacity"][engine] = cap
        print(
            f"[{engine}] gendr-serve capacity {cap['output_mp_s']:.3f} MP/s = {cap['req_s']:.2f} req/s",
            flush=True,
        )
        broken: set[str] = set()
        for load in a.loads:  # rounds: every system once per load level, in the same order
            for s in chosen:
                if s.key in broken:
                    continue
                try:
                    row = cell(s, engine, load, load * cap["req_s"], prep, pool, a)
                except Exception as e:  # a peer that cannot start is a result too: record why
                    log = WORK / "logs" / f"{engine}-{s.key}-{int(load * 100)}.log"
                    row = {"system": s.name, "key": s.key, "engine": engine, "load": load}
                    row.update(error=f"{type(e).__name__}: {e}", log_tail=tail(log))
                    broken.add(s.key)
                else:
                    result["systems"][s.name].setdefault("startup_s", row["startup_s"])
                print(progress(engine, row), flush=True)
                result["cells"].append(row)
                a.out.write_text(json.dumps(result, indent=1, default=str))
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    a.out.write_text(json.dumps(result, indent=1, default=str))
    md = a.out.with_suffix(".md")
    md.write_text(report.markdown(result))
    report.plot(result, a.plot)
    print(md.read_text())
    print(f"wrote {a.out}, {md}, {a.plot} in {result['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
