"""The job store: drain keeps what was admitted, TTL, byte cap, job limit, records survive a restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from jobs_helpers import jobs_app, noise_png, photo_png


def test_drain_finishes_running_jobs_and_fails_queued_ones_clearly(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path) as j:
            running = (await j.client.post("/v1/jobs?scale=2", content=photo_png(56))).json()
            queued = (await j.client.post("/v1/jobs?scale=1", content=photo_png(40))).json()
            j.gate.allow(1)
            await j.wait(running["id"], lambda b: b["state"] == "running")
            drain = asyncio.create_task(j.app.state.gendr.drain(30))
            failed = await j.wait(queued["id"], lambda b: b["state"] == "failed")
            assert failed["error"]["code"] == "draining" and "submit it again" in failed["error"]["message"]
            late = await j.client.post("/v1/jobs?scale=1", content=photo_png(40))
            assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
            await asyncio.sleep(0.1)
            assert not drain.done()  # the running job holds the drain
            j.gate.open()
            assert await drain is True
            done = (await j.client.get(f"/v1/jobs/{running['id']}")).json()
            assert done["state"] == "succeeded"  # written before the drain returned
            assert (await j.client.get(done["result_url"])).status_code == 200
            assert j.batcher.stats()["reserved_tiles"] == 0

    asyncio.run(main())


def test_finished_jobs_are_forgotten_after_the_ttl(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path, jobs_ttl_s=0.2) as j:
            j.gate.open()
            job = (await j.client.post("/v1/jobs?scale=1", content=photo_png(40))).json()
            await j.wait(job["id"], lambda b: b["state"] == "succeeded")
            assert len(list((tmp_path / "jobs").iterdir())) == 2  # result + record
            await asyncio.sleep(0.3)
            r = await j.client.get(f"/v1/jobs/{job['id']}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
            assert not list((tmp_path / "jobs").iterdir())

    asyncio.run(main())


def test_byte_cap_expires_the_oldest_result(tmp_path: Path) -> None:
    """Noise PNGs of 32² are ~3 KB: two do not fit in 5000 bytes; one of 48² (~7 KB) never does."""

    async def main() -> None:
        async with jobs_app(tmp_path, jobs_max_bytes=5000) as j:
            j.gate.open()
            ids = []
            for seed in (1, 2):
                r = await j.client.post("/v1/jobs?scale=1&format=png", content=noise_png(32, seed))
                ids.append(r.json()["id"])
                await j.wait(ids[-1], lambda b: b["state"] == "succeeded")
            old = (await j.client.get(f"/v1/jobs/{ids[0]}")).json()
            assert old["state"] == "expired"
            r = await j.client.get(f"/v1/jobs/{ids[0]}/result")
            assert r.status_code == 410 and r.json()["error"]["code"] == "job_expired"
            assert (await j.client.get(f"/v1/jobs/{ids[1]}/result")).status_code == 200
            big = (await j.client.post("/v1/jobs?scale=1&format=png", content=noise_png(48))).json()
            failed = await j.wait(big["id"], lambda b: b["state"] == "failed")
            assert (
                failed["error"]["code"] == "image_too_large"
                and "jobs_max_bytes" in failed["error"]["message"]
            )
            r = await j.client.get(f"/v1/jobs/{big['id']}/result")
            assert r.status_code == 409 and r.json()["error"]["code"] == "job_failed"
            assert sum(p.stat().st_size for p in (tmp_path / "jobs").glob("*.png")) <= 5000

    asyncio.run(main())


def test_job_limit_is_a_503_only_while_every_held_job_is_unfinished(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path, jobs_max=1) as j:
            first = (await j.client.post("/v1/jobs?scale=1", content=photo_png(40))).json()
            r = await j.client.post("/v1/jobs?scale=1", content=photo_png(40))
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert "retry-after" in r.headers
            j.gate.open()
            await j.wait(first["id"], lambda b: b["state"] == "succeeded")
            second = await j.client.post("/v1/jobs?scale=1", content=photo_png(40))
            assert second.status_code == 202  # the finished one made room
            assert (await j.client.get(f"/v1/jobs/{first['id']}")).status_code == 404

    asyncio.run(main())


def test_records_survive_a_restart(tmp_path: Path) -> None:
    async def first_process() -> tuple[str, str, bytes]:
        async with jobs_app(tmp_path) as j:
            ok = (await j.client.post("/v1/jobs?scale=1", content=photo_png(40))).json()
            j.gate.allow(1000)
            await j.wait(ok["id"], lambda b: b["state"] == "succeeded")
            image = (await j.client.get(f"/v1/jobs/{ok['id']}/result")).content
            crashed = json.loads((tmp_path / "jobs" / f"{ok['id']}.json").read_text())
            crashed.update(id="C" * 24, phase="active", finished_at=None)  # as a killed process leaves it
            (tmp_path / "jobs" / f"{'C' * 24}.json").write_text(json.dumps(crashed))
            return ok["id"], "C" * 24, image

    async def second_process(ok: str, crashed: str, image: bytes) -> None:
        async with jobs_app(tmp_path) as j:
            assert (await j.client.get(f"/v1/jobs/{ok}")).json()["state"] == "succeeded"
            assert (await j.client.get(f"/v1/jobs/{ok}/result")).content == image
            lost = (await j.client.get(f"/v1/jobs/{crashed}")).json()
            assert lost["state"] == "failed" and lost["error"]["code"] == "interrupted"

    asyncio.run(second_process(*asyncio.run(first_process())))
