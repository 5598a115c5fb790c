"""The shared job store on a real redis-server: any replica answers, idempotency, cancel from anywhere,
drain hands work back, Redis down is a 503 (never a 500) and the layer recovers by itself."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image
from redis_server import redis_server
from shared_helpers import png, replica

pytest.importorskip("redis")


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_a_job_submitted_on_one_replica_is_answered_by_another(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as rs:
            async with replica(tmp_path / "a", rs.url) as a, replica(tmp_path / "b", rs.url) as b:
                r = await a.client.post("/v1/jobs?scale=2", content=png(40))
                assert r.status_code == 202, r.text
                job = r.json()
                assert r.headers["location"] == f"/v1/jobs/{job['id']}"
                done = await b.wait(job["id"], lambda j: j["state"] == "succeeded")
                assert done["tiles"]["done"] == done["tiles"]["total"] >= 1
                res = await b.client.get(done["result_url"])
                assert res.status_code == 200 and res.headers["x-image-size"] == "80x80"
                assert Image.open(io.BytesIO(res.content)).size == (80, 80)
                same = await a.client.get(done["result_url"])
                assert same.content == res.content
                assert (await b.client.get("/v1/jobs/AAAAAAAAAAAAAAAAAAAAAAAA")).status_code == 404

    run(main())


def test_the_same_idempotency_key_makes_one_job(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as rs:
            async with replica(tmp_path / "a", rs.url) as a, replica(tmp_path / "b", rs.url) as b:
                h = {"Idempotency-Key": "order-17"}
                first = await a.client.post("/v1/jobs?scale=2", content=png(40), headers=h)
                again = await b.client.post("/v1/jobs?scale=2", content=png(40), headers=h)
                assert first.status_code == 202 and again.status_code == 200
                assert first.json()["id"] == again.json()["id"]
                other = await b.client.post("/v1/jobs?scale=2", content=png(40, seed=1), headers=h)
                assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
                opts = await b.client.post("/v1/jobs?scale=1", content=png(40), headers=h)
                assert opts.status_code == 409
                bad = await a.client.post("/v1/jobs", content=png(40), headers={"Idempotency-Key": "a b"})
                assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
                free = await a.client.post("/v1/jobs?scale=2", content=png(40))
                assert free.json()["id"] != first.json()["id"]

    run(main())


def test_cancel_reaches_the_replica_running_the_job(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as rs:
            async with (
                replica(tmp_path / "a", rs.url, fake_per_tile_s=0.2) as a,
                replica(tmp_path / "b", rs.url, fake_per_tile_s=0.2) as b,
            ):
                job = (await b.client.post("/v1/jobs?scale=4", content=png(96))).json()
                assert job["tiles"]["total"] >= 9
                await a.wait(job["id"], lambda j: j["state"] == "running")
                holder, other = (a, b) if job["id"] in a.shared.worker.held else (b, a)
                assert job["id"] in holder.shared.worker.held
                gone = await other.client.delete(f"/v1/jobs/{job['id']}")
                assert gone.status_code == 200 and gone.json()["deleted"] is True
                assert gone.json()["state"] == "cancelled"
                assert (await holder.client.get(f"/v1/jobs/{job['id']}")).status_code == 404
                for _ in range(200):  # the holder drops its tiles at the next batch or heartbeat
                    if not holder.shared.worker.held:
                        break
                    await asyncio.sleep(0.02)
                assert not holder.shared.worker.held
                for _ in range(100):
                    stats = holder.app.state.gendr.runtime.get("fake").batcher.stats()
                    if stats["reserved_tiles"] == 0:
                        break
                    await asyncio.sleep(0.05)
                assert stats["reserved_tiles"] == 0
                assert await holder.shared.backlog("fake") == (0, 0)

    run(main())


def test_draining_replica_hands_unstarted_jobs_to_another(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as rs:
            async with replica(tmp_path / "a", rs.url, fake_per_tile_s=0.3) as a:
                posts = [await a.client.post("/v1/jobs?scale=2", content=png(64, seed=i)) for i in range(4)]
                ids = [p.json()["id"] for p in posts]
                await a.wait(ids[0], lambda j: j["state"] == "running")
                assert len(a.shared.worker.held) == 1  # pulled only what it can start: the rest wait in Redis
                drain = asyncio.create_task(a.app.state.gendr.drain(10))
                async with replica(tmp_path / "b", rs.url) as b:
                    for job_id in ids:
                        done = await b.wait(job_id, lambda j: j["state"] in ("succeeded", "failed"))
                        assert done["state"] == "succeeded", done
                    assert await drain is True

    run(main())


def test_redis_down_is_a_503_and_the_layer_recovers(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as rs:
            async with replica(tmp_path / "a", rs.url) as a:
                kept = (await a.client.post("/v1/jobs?scale=2", content=png(40))).json()
                await a.wait(kept["id"], lambda j: j["state"] == "succeeded")
                rs.stop()
                r = await a.client.post("/v1/jobs?scale=2", content=png(40))
                assert r.status_code == 503 and r.json()["error"]["code"] == "job_store_unavailable"
                assert int(r.headers["retry-after"]) >= 1
                g = await a.client.get(f"/v1/jobs/{kept['id']}")
                assert g.status_code == 503
                up = await a.client.post("/upscale?scale=2", content=png(40))
                assert up.status_code == 200  # the synchronous path never needs Redis
                rs.start()  # same folder: the AOF brings the records back
                again = await a.wait(kept["id"], lambda j: j["state"] == "succeeded")
                assert again["output"]["bytes"] > 0
                new = (await a.client.post("/v1/jobs?scale=2", content=png(40))).json()
                assert (await a.wait(new["id"], lambda j: j["state"] == "succeeded"))["state"] == "succeeded"

    run(main())


def test_the_byte_budget_expires_the_oldest_results(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as rs:
            async with replica(tmp_path / "a", rs.url, jobs_max_bytes=60_000) as a:
                ids = []
                for i in range(3):  # ~30 kB each (noise does not compress)
                    job = (await a.client.post("/v1/jobs?scale=2", content=png(48, seed=i))).json()
                    await a.wait(job["id"], lambda j: j["state"] == "succeeded")
                    ids.append(job["id"])
                first = await a.client.get(f"/v1/jobs/{ids[0]}")
                assert first.json()["state"] == "expired"
                assert (await a.client.get(f"/v1/jobs/{ids[0]}/result")).status_code == 410
                assert (await a.client.get(f"/v1/jobs/{ids[2]}/result")).status_code == 200

    run(main())
