"""POST/GET/DELETE /v1/jobs against the real Runtime (fake backend whose batches the test releases)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from http_helpers import decode
from jobs_helpers import jobs_app, photo_png


def test_job_reports_progress_and_returns_the_same_image_as_upscale(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path) as j:
            data = photo_png(56)
            r = await j.client.post("/v1/jobs?scale=2&format=png", content=data)
            assert r.status_code == 202, r.text
            job = r.json()
            assert r.headers["location"] == f"/v1/jobs/{job['id']}"
            assert len(job["id"]) >= 24 and job["state"] == "queued"
            total = job["tiles"]["total"]
            assert total >= 4 and job["tiles"]["done"] == 0 and job["queue_position"] == 0
            assert (await j.client.get(f"/v1/jobs/{job['id']}/result")).json()["error"]["code"] == (
                "job_not_finished"
            )

            j.gate.allow(2)  # exactly two batches of one tile
            mid = await j.wait(job["id"], lambda b: b["tiles"]["done"] == 2)
            assert mid["state"] == "running" and mid["queue_position"] == 0
            assert 0 < mid["progress"] < 1 and mid["eta_s"] is not None and mid["eta_s"] >= 0
            await asyncio.sleep(0.05)
            again = (await j.client.get(f"/v1/jobs/{job['id']}")).json()
            assert again["tiles"]["done"] == 2  # nothing ran past the gate

            j.gate.open()
            done = await j.wait(job["id"], lambda b: b["state"] == "succeeded")
            assert done["tiles"] == {"done": total, "total": total} and done["progress"] == 1
            assert done["result_url"] == f"/v1/jobs/{job['id']}/result"
            res = await j.client.get(done["result_url"])
            assert res.status_code == 200 and res.headers["content-type"] == "image/png"
            assert res.headers["x-image-size"] == "112x" + str(decode(data).height * 2)
            assert int(res.headers["x-tiles"]) == total and done["output"]["bytes"] == len(res.content)

            direct = await j.client.post("/upscale?scale=2&format=png", content=data)
            assert direct.status_code == 200 and direct.headers["x-tiles"] == str(total)
            assert direct.content == res.content  # the same pipeline, byte for byte

    asyncio.run(main())


def test_queue_position_counts_the_jobs_ahead(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path, per_tile_s=0.01) as j:  # warm-up measures 100 tiles/s
            ids = []
            for _ in range(3):
                r = await j.client.post("/v1/jobs?scale=1", content=photo_png(40))
                assert r.status_code == 202
                ids.append(r.json()["id"])
            j.gate.allow(1)
            first = await j.wait(ids[0], lambda b: b["state"] == "running")
            assert first["queue_position"] == 0
            states = [(await j.client.get(f"/v1/jobs/{i}")).json() for i in ids[1:]]
            assert [s["queue_position"] for s in states] == [1, 2]
            assert [s["state"] for s in states] == ["queued", "queued"]
            assert states[1]["eta_s"] > states[0]["eta_s"] > 0  # more work ahead, later
            j.gate.open()
            for i in ids:
                await j.wait(i, lambda b: b["state"] == "succeeded")

    asyncio.run(main())


def test_admission_is_the_same_as_upscale(tmp_path: Path) -> None:
    """A job that does not fit the queue is a 503 with Retry-After, as /upscale is; nothing is held."""

    async def main() -> None:
        async with jobs_app(tmp_path, queue_capacity_tiles=6) as j:
            first = await j.client.post("/v1/jobs?scale=1", content=photo_png(56))
            assert first.status_code == 202
            held = j.batcher.stats()["reserved_tiles"]
            assert held == first.json()["tiles"]["total"]
            for path in ("/v1/jobs?scale=1", "/upscale?scale=1"):
                r = await j.client.post(path, content=photo_png(56))
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
            assert j.batcher.stats()["reserved_tiles"] == held
            j.gate.open()
            await j.wait(first.json()["id"], lambda b: b["state"] == "succeeded")
            assert j.batcher.stats()["reserved_tiles"] == 0

    asyncio.run(main())


def test_delete_cancels_and_frees_the_tiles(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path) as j:
            job = (await j.client.post("/v1/jobs?scale=2", content=photo_png(56))).json()
            j.gate.allow(1)
            await j.wait(job["id"], lambda b: b["tiles"]["done"] == 1)
            assert j.batcher.stats()["reserved_tiles"] == job["tiles"]["total"]
            r = await j.client.delete(f"/v1/jobs/{job['id']}")
            assert r.status_code == 200 and r.json()["state"] == "cancelled" and r.json()["deleted"]
            assert j.batcher.stats()["reserved_tiles"] == 0
            assert j.batcher.stats()["queued_tiles"] == 0
            gone = await j.client.get(f"/v1/jobs/{job['id']}")
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"
            assert not list((tmp_path / "jobs").iterdir())

    asyncio.run(main())


def test_a_job_is_visible_only_to_the_key_that_made_it(tmp_path: Path) -> None:
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}

    async def main() -> None:
        async with jobs_app(tmp_path, api_keys=["key-a", "key-b"]) as j:
            j.gate.open()
            assert (await j.client.post("/v1/jobs", content=photo_png(40))).status_code == 401
            r = await j.client.post("/v1/jobs?scale=1", content=photo_png(40), headers=a)
            assert r.status_code == 202
            url = r.headers["location"]
            assert (await j.client.get(url)).status_code == 401
            for path in (url, url + "/result"):
                other = await j.client.get(path, headers=b)
                assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
            assert (await j.client.delete(url, headers=b)).status_code == 404
            j.client.headers.update(a)
            await j.wait(r.json()["id"], lambda s: s["state"] == "succeeded")
            assert (await j.client.get(url + "/result")).status_code == 200
            record = (tmp_path / "jobs" / f"{r.json()['id']}.json").read_text()
            assert "key-a" not in record  # only a digest of the key is stored

    asyncio.run(main())


def test_client_mistakes_are_4xx_json(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path) as j:
            cases = [
                (await j.client.post("/v1/jobs?scale=1&bogus=1", content=photo_png(40)), 400, "bad_request"),
                (await j.client.post("/v1/jobs?scale=1", content=b"not an image"), 415, None),
                (await j.client.post("/v1/jobs?model=nope", content=photo_png(40)), 404, "model_not_found"),
                (await j.client.get("/v1/jobs/" + "A" * 24), 404, "job_not_found"),
                (await j.client.get("/v1/jobs/bad!id"), 400, "bad_request"),
                (await j.client.delete("/v1/jobs/" + "A" * 24), 404, "job_not_found"),
            ]
            for r, status, code in cases:
                assert r.status_code == status, r.text
                assert r.json()["error"]["code"] == (code or r.json()["error"]["code"])
            assert j.batcher.stats()["reserved_tiles"] == 0

    asyncio.run(main())
