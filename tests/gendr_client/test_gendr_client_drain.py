"""SIGTERM with jobs in flight, seen from the client; and the `gendr-client` command (folder, resume)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from live_server import free_port, live_server
from PIL import Image
from skimage import data

from gendr_client import Client, Result


def png(width: int) -> bytes:
    im = Image.fromarray(data.chelsea()).resize((width, width), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_drain_finishes_the_running_job_and_the_client_gets_it(tmp_path: Path) -> None:
    """The running job finishes during the drain; the queued one fails `draining`; after a restart on the
    same jobs folder the client, still polling, collects its result (if it had not already)."""
    port = free_port()
    seen: list[tuple[int, int]] = []
    box: dict[str, object] = {}
    with live_server(tmp_path, port=port, GENDR_MAX_BATCH="1") as srv:
        srv.hold()
        client = Client(srv.url, deadline_s=120, poll_s=0.05)

        def run() -> None:
            box["r"] = client.upscale(
                png(120), scale=1, use_job=True, on_progress=lambda d, t: seen.append((d, t))
            )

        t = threading.Thread(target=run)
        t.start()
        srv.wait_for(lambda: bool(seen), "the job never started")
        queued = httpx.post(f"{srv.url}/v1/jobs?scale=1", content=png(40)).json()
        assert queued["state"] == "queued"
        srv.hold(allow=1)
        srv.wait_for(lambda: any(d >= 1 for d, _ in seen), "the first tile never landed")

        srv.proc.send_signal(signal.SIGTERM)
        job_url = f"{srv.url}/v1/jobs/{queued['id']}"
        srv.wait_for(lambda: httpx.get(job_url).json()["state"] == "failed", "the queued job was not failed")
        assert httpx.get(job_url).json()["error"]["code"] == "draining"
        late = httpx.post(f"{srv.url}/v1/jobs?scale=1", content=png(40))
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        assert "r" not in box  # the running job is held by the gate, the drain waits for it
        srv.release()
        assert srv.proc.wait(30) == 0

    with live_server(tmp_path, port=port):  # a restart on the same folder
        t.join(60)
    res = box.get("r")
    assert isinstance(res, Result), box
    assert (res.width, res.height) == (120, 120) and seen[-1] == (9, 9)
    client.close()


def test_cli_folder_in_folder_out_with_resume(tmp_path: Path) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        (src / f"img{i}.png").write_bytes(png(24 + 8 * i))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with live_server(tmp_path / "srv", GENDR_API_KEYS="cli-key") as srv:
        cmd = [sys.executable, "-m", "gendr_client.cli", str(src), str(dst), "--url", srv.url, "-q"]
        cmd += ["--api-key", "cli-key", "--concurrency", "2", "--scale", "2", "--format", "jpeg"]
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert first.returncode == 1, first.stderr  # one input is broken
        assert "3 done, 0 skipped" in first.stdout and "broken.png" in first.stderr
        assert sorted(p.name for p in dst.iterdir()) == ["img0.jpg", "img1.jpg", "img2.jpg"]
        assert Image.open(dst / "img2.jpg").size == (80, 80)

        (src / "broken.png").unlink()
        (dst / "img1.jpg").unlink()
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "1 done, 2 skipped" in again.stdout

        usage = subprocess.run([*cmd, "--concurrency", "0"], capture_output=True, text=True, timeout=60)
        assert usage.returncode == 2
