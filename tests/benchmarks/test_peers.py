"""The peers benchmark's pure parts (benchmarks/peers): what makes its figures comparable and right.

Same requests for every system (a deterministic generator with the documented size mix), correct
percentiles and rates, the cost-model engine's cost and output, the Triton wire format, the /proc
accounting. No venvs, no servers, nothing that depends on this machine's speed.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

import client  # noqa: E402
import engines  # noqa: E402
import procmon  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import stats  # noqa: E402
import traffic  # noqa: E402


@pytest.fixture(scope="module")
def pool() -> list[traffic.PoolImage]:
    return traffic.make_pool(per_class=3, seed=5)


def test_pool_is_deterministic_real_photos_in_the_documented_size_classes(pool) -> None:
    again = traffic.make_pool(per_class=3, seed=5)
    assert [im.png for im in again] == [im.png for im in pool]
    assert [im.png for im in traffic.make_pool(per_class=3, seed=6)] != [im.png for im in pool]
    bounds = {name: (lo, hi) for name, _, lo, hi in traffic.SIZE_CLASSES}
    assert sorted({im.size_class for im in pool}) == sorted(bounds)
    for im in pool:
        with Image.open(io.BytesIO(im.png)) as decoded:
            assert decoded.format == "PNG" and decoded.size == (im.width, im.height)
            assert decoded.mode == "RGB"
            arr = np.asarray(decoded)
        lo, hi = bounds[im.size_class]
        assert lo <= max(im.width, im.height) <= hi
        assert 0.6 - 0.01 <= min(im.width, im.height) / max(im.width, im.height) <= 1.0
        assert arr.std() > 5  # a photo, not a flat fill
        assert im.photo in traffic.PHOTOS


def test_arrivals_are_seeded_poisson_with_the_documented_mix(pool) -> None:
    a = traffic.arrivals(pool, rate=50.0, duration=200.0, seed=3)
    assert a == traffic.arrivals(pool, rate=50.0, duration=200.0, seed=3)
    assert a != traffic.arrivals(pool, rate=50.0, duration=200.0, seed=4)
    times = [x.t for x in a]
    assert times == sorted(times) and 0 < times[0] and times[-1] < 200.0
    assert len(a) == pytest.approx(50 * 200, rel=0.05)
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps: CV 1
    share = {c: sum(pool[x.image].size_class == c for x in a) / len(a) for c in traffic.CLASS_NAMES}
    for name, p, _, _ in traffic.SIZE_CLASSES:
        assert share[name] == pytest.approx(p, abs=0.02)
    assert traffic.arrivals(pool, rate=0.0, duration=10.0) == []


def test_mean_output_mp_weights_each_class_by_its_probability(pool) -> None:
    want = 0.0
    for name, p, _, _ in traffic.SIZE_CLASSES:
        px = [im.pixels for im in pool if im.size_class == name]
        want += p * sum(px) / len(px) * 16 / 1e6
    assert traffic.mean_output_mp(pool) == pytest.approx(want)


def test_percentile_matches_numpy_and_refuses_nonsense() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        xs = list(rng.exponential(size=n))
        for q in (0, 50, 95, 99, 100):
            assert stats.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert np.isnan(stats.percentile([], 50))
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_summary_rates_per_class_and_latency_of_successes_only() -> None:
    R = stats.Record
    records = [
        R("tiny", "ok", 0.1, 1_000_000, 200),
        R("tiny", "shed", 0.001, 0, 503),
        R("large", "ok", 2.0, 3_000_000, 200),
        R("large", "timeout", 30.0, 0),
        R("large", "error", 0.5, 0, 500),
    ]
    s = stats.summarise(records, wall_s=2.0, classes=("tiny", "large", "medium"))
    assert s["sent"] == 5 and s["ok"] == 2
    assert s["output_mp"] == 4.0 and s["output_mp_s"] == 2.0
    assert s["p50_s"] == pytest.approx(1.05) and s["p99_s"] == pytest.approx(1.981)  # ok requests only
    assert (s["shed_rate"], s["timeout_rate"], s["error_rate"]) == (0.2, 0.2, 0.2)
    tiny, large, medium = (s["by_class"][c] for c in ("tiny", "large", "medium"))
    assert tiny["shed_rate"] == 0.5 and tiny["p95_s"] == pytest.approx(0.1)
    assert large["timeout_rate"] == large["error_rate"] == pytest.approx(1 / 3, abs=1e-4)  # 4 places
    assert medium["sent"] == 0 and np.isnan(medium["p95_s"])


def test_cost_model_costs_a_plus_b_per_tile_area_and_upscales_by_nearest_neighbour(tmp_path: Path) -> None:
    assert engines.cost_s(128 * 128) == pytest.approx(engines.A_S + engines.B_S)
    assert engines.cost_s(1000 * 600) == pytest.approx(0.015 + 0.004 * 600_000 / 16384)
    e = engines.CostModelEngine(tmp_path / "lock", a=0.02, b=0.08)
    img = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    t0 = time.monotonic()
    out = e(img)
    assert time.monotonic() - t0 >= 0.02 + 0.08 * 64 * 96 / 16384  # sleeps at least its cost
    assert out.shape == (256, 384, 3)
    assert np.array_equal(out, img.repeat(4, axis=0).repeat(4, axis=1))
    assert [o.shape for o in e.many([img, img[:8, :16]])] == [(256, 384, 3), (32, 64, 3)]


def test_device_lock_serialises_holders_of_separate_opens(tmp_path: Path) -> None:
    """flock excludes every other open of the file: other processes of a multi-worker peer included."""
    first, second = engines.DeviceLock(tmp_path / "gpu"), engines.DeviceLock(tmp_path / "gpu")
    got = threading.Event()

    def take() -> None:
        with second:
            got.set()

    with first:
        t = threading.Thread(target=take)
        t.start()
        assert not got.wait(0.3)  # blocked while the first holder holds it
    t.join(10)
    assert got.is_set()


def test_device_lock_serialises_threads_sharing_one_open(tmp_path: Path) -> None:
    """Threads of one worker share its descriptor, where flock alone would let both in at once."""
    lock = engines.DeviceLock(tmp_path / "gpu")
    got = threading.Event()

    def take() -> None:
        with lock:
            got.set()

    with lock:
        t = threading.Thread(target=take)
        t.start()
        assert not got.wait(0.3)  # blocked while this thread holds it
    t.join(10)
    assert got.is_set()


def test_png_roundtrip_uses_the_services_png_level() -> None:
    from service.settings import Settings

    assert engines.PNG_LEVEL == Settings.model_fields["png_compress_level"].default
    img = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    png = engines.encode_png(img)
    assert client.png_size(png) == (30, 20)
    assert np.array_equal(engines.decode_png(png), img)
    assert client.png_size(b"GIF89a" + b"\0" * 30) is None


def test_triton_binary_request_and_response_framing() -> None:
    png = engines.encode_png(np.zeros((4, 5, 3), np.uint8))
    body, headers = client.triton_request(png)
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert head["inputs"][0]["datatype"] == "BYTES" and head["inputs"][0]["shape"] == [1, 1]
    assert head["inputs"][0]["parameters"]["binary_data_size"] == len(body) - n
    assert struct.unpack("<I", body[n : n + 4])[0] == len(png) and body[n + 4 :] == png
    out_head = b'{"outputs":[]}'
    resp = httpx.Response(
        200,
        headers={"Inference-Header-Content-Length": str(len(out_head))},
        content=out_head + struct.pack("<I", len(png)) + png + b"junk",
    )
    assert client.triton_png(resp) == png
    assert client.triton_png(httpx.Response(200, content=b"{}")) is None


def test_process_tree_cpu_and_rss_come_from_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while child.pid not in procmon.tree(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in procmon.tree(os.getpid())
        assert procmon.rss_bytes(os.getpid()) > procmon.rss_bytes(child.pid) > 0
        before = procmon.cpu_seconds(os.getpid())
        t = time.process_time()
        while time.process_time() - t < 0.3:  # burn CPU time, not wall time
            pass
        assert procmon.cpu_seconds(os.getpid()) - before >= 0.25
    finally:
        child.kill()
        child.wait()


def test_defaults_plan_a_full_run_under_30_minutes_and_a_short_quick_run() -> None:
    full = run.parse_args([])
    assert full.systems == ["ours", "litserve", "ray", "pytriton", "fastapi"]
    assert full.loads == [0.5, 0.9, 1.5] and full.engines == ["cost", "onnx"]
    assert run.planned_s(full) < 30 * 60
    quick = run.parse_args(["--quick"])
    assert quick.loads == [0.9] and len(quick.systems) == 2 and run.planned_s(quick) < 4 * 60
    assert quick.out != full.out  # a quick run never overwrites the published results
    sub = run.parse_args(["--systems", "ours,ray", "--engines", "onnx", "--loads", "1.5"])
    assert (sub.systems, sub.engines, sub.loads) == (["ours", "ray"], ["onnx"], [1.5])


def _result() -> dict[str, Any]:
    by = {c: {"sent": 1, "p95_s": 0.2, "shed_rate": 0.0, "timeout_rate": 0.5, "error_rate": 0.0}
          for c in traffic.CLASS_NAMES}  # fmt: skip
    ok = {"system": "gendr-serve", "engine": "cost", "load": 0.9, "offered_req_s": 3.0, "output_mp_s": 1.5,
          "p50_s": 0.1, "p95_s": 0.2, "p99_s": 0.3, "by_class": by, "shed_rate": 0.0, "timeout_rate": 0.5,
          "error_rate": 0.0, "cpu_s_per_mp": 0.05, "peak_rss_mb": 500.0, "load_avg_before": 1.0}  # fmt: skip
    failed = {"system": "Ray Serve", "engine": "cost", "load": 0.9, "error": "RuntimeError: exited with 1"}
    result = {
        "machine": {"cpu": "X", "cores": 2},
        "config": {
            "command": "run.py",
            "cell_s": {"cost": 20.0},
            "seed": 1,
            "timeout_s": 30.0,
            "loads": [0.9],
        },
        "capacity": {"cost": {"output_mp_s": 2.0, "req_s": 1.0}},
        "cells": [ok, failed],
        "systems": {"gendr-serve": {"workers_note": "1", "batching": "tiles", "startup_s": 2.0}},
    }
    return result


def test_report_tables_every_cell_and_names_failures() -> None:
    md = report.markdown(_result())
    assert "| gendr-serve | 90% | 3.00 | 1.500 | 100 | 200 | 300 | 200 | 200 | 200 | 0 | 50 | 0 |" in md
    assert "| Ray Serve | 90% | failed: RuntimeError: exited with 1 |" in md


def test_plot_draws_the_successful_cells(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # not in an extra yet: the harness's .venv has it
    report.plot(_result(), tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").format == "PNG"
