"""GET /v1/jobs, GET /v1/jobs/{id}/events and the job metrics on the shared store (a real redis-server):
any replica lists and streams any job; the per-owner index follows SUBMIT, CANCEL and expiry."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer, live_server, photo_png
from redis_server import redis_server
from shared_helpers import png, replica
from wire_formats import metric
from wire_formats import parse_sse as sse

pytest.importorskip("redis")

from service.jobs import listing
from service.jobs.records import owner_of
from service.jobs.redis_store import RedisJobs, connect
from service.settings import Settings

KEYS = ["key-one", "key-two"]
ONE = {"Authorization": "Bearer key-one"}
TWO = {"Authorization": "Bearer key-two"}
OWNER_ONE = owner_of(ONE["Authorization"], True)


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


async def list_all(client: httpx.AsyncClient, headers: dict[str, str], limit: int) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        q = f"/v1/jobs?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        r = await client.get(q, headers=headers)
        assert r.status_code == 200, r.text
        ids += [d["id"] for d in r.json()["data"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return ids


def test_any_replica_lists_the_callers_jobs_newest_first(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as rs:
            async with (
                replica(tmp_path / "a", rs.url, api_keys=KEYS) as a,
                replica(tmp_path / "b", rs.url, api_keys=KEYS) as b,
            ):
                mine = []
                for i in range(5):
                    h = {**ONE, "Idempotency-Key": f"k{i}"}
                    r = await (a if i % 2 else b).client.post(
                        "/v1/jobs?scale=2", content=png(32, seed=i), headers=h
                    )
                    assert r.status_code == 202, r.text
                    mine.append(r.json()["id"])
                again = await a.client.post(
                    "/v1/jobs?scale=2", content=png(32, seed=0), headers={**ONE, "Idempotency-Key": "k0"}
                )
                assert again.status_code == 200  # the same job: no second entry in the list
                theirs = (await b.client.post("/v1/jobs?scale=2", content=png(32), headers=TWO)).json()["id"]

                assert await list_all(b.client, ONE, 2) == mine[::-1]  # every job once, newest first
                assert await list_all(a.client, ONE, 100) == mine[::-1]
                assert await list_all(a.client, TWO, 3) == [theirs]
                page = (await a.client.get("/v1/jobs?limit=1", headers=ONE)).json()
                assert page["data"][0]["id"] == mine[-1] and page["data"][0]["state"] in (
                    "queued",
                    "running",
                    "succeeded",
                )

                assert (await b.client.delete(f"/v1/jobs/{mine[2]}", headers=ONE)).status_code == 200
                r = a.shared.jobs.r
                assert (
                    await r.zscore(a.shared.jobs.owner_index(OWNER_ONE), mine[2]) is None
                )  # CANCEL took it out
                assert mine[2] not in await list_all(a.client, ONE, 2)
                for q in ("limit=0", "limit=101", "cursor=%21%21"):
                    assert (await a.client.get(f"/v1/jobs?{q}", headers=ONE)).status_code == 400
                assert (await a.client.get("/v1/jobs")).status_code == 401

    run(main())


def test_expired_jobs_leave_the_index_when_listed_and_an_open_server_lists_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as rs:
            async with replica(tmp_path / "a", rs.url, api_keys=KEYS, jobs_ttl_s=1.0) as a:
                ids = [
                    (await a.client.post("/v1/jobs?scale=2", content=png(32, seed=i), headers=ONE)).json()[
                        "id"
                    ]
                    for i in range(3)
                ]
                for job_id in ids:
                    await a.wait(job_id, lambda j: j["state"] == "succeeded", headers=ONE)
                idx = a.shared.jobs.owner_index(OWNER_ONE)
                assert await a.shared.jobs.r.zcard(idx) == 3
                await asyncio.sleep(1.3)  # the records' TTL runs out; the index still names them
                assert await a.shared.jobs.r.zcard(idx) == 3
                body = (await a.client.get("/v1/jobs", headers=ONE)).json()
                assert body == {"object": "list", "data": [], "next_cursor": None}
                assert await a.shared.jobs.r.zcard(idx) == 0  # trimmed by the listing that met them
            async with replica(tmp_path / "open", rs.url) as o:
                r = await o.client.get("/v1/jobs")
                assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"

    run(main())


def test_paging_is_exact_through_equal_times_and_gone_jobs(tmp_path: Path) -> None:
    """Jobs created in the same instant page without a gap or a repeat; a page that meets many gone
    jobs stops after a bounded number of index reads and hands back a cursor to go on from."""

    async def main() -> None:
        with redis_server(tmp_path / "redis") as rs:
            s = Settings(redis_url=rs.url)
            j = RedisJobs(connect(s), s)
            now = time.time()
            ids = []
            for i in range(7):  # the oldest, four in the same instant, two newer ones
                t = now - 10 if i == 0 else now if i < 5 else now + i
                job_id, _ = await j.submit(
                    model="m", data=b"x", tiles=1, owner="o", idempotency=None,
                    fields={"model": "m", "tiles_total": 1, "format": "png", "created_at": t},
                )  # fmt: skip
                ids.append(job_id)
            got, cursor = [], None
            while True:
                recs, nxt = await j.list_owner("o", 2, cursor)
                got += [r["id"] for _, r in recs]
                if nxt is None:
                    break
                cursor = listing.decode_cursor(listing.encode_cursor(nxt))
            assert sorted(got) == sorted(ids) and len(got) == 7
            assert got[:2] == [ids[6], ids[5]] and got[-1] == ids[0]  # newest first, the equal four between

            for job_id in ids[1:]:
                await j.r.delete(j.job(job_id))  # as if their TTL ran out
            monkey = pytest.MonkeyPatch()
            monkey.setattr("service.jobs.redis_store.LIST_ROUNDS", 2)
            try:
                recs, nxt = await j.list_owner("o", 1, None)  # 2 rounds of 2 entries, all gone
                assert recs == [] and nxt is not None
                recs, nxt = await j.list_owner("o", 1, nxt)
                assert [r["id"] for _, r in recs] == [ids[0]] and nxt is None
            finally:
                monkey.undo()
            assert await j.r.zcard(j.owner_index("o")) == 1
            await j.r.aclose()

    run(main())


def test_events_of_a_job_stream_from_any_replica_and_metrics_count_where_things_happen(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as rs:
            async with (
                replica(tmp_path / "a", rs.url, api_keys=KEYS, fake_per_tile_s=0.1) as a,
                replica(tmp_path / "b", rs.url, api_keys=KEYS, fake_per_tile_s=0.1) as b,
            ):
                job = (await a.client.post("/v1/jobs?scale=4", content=png(48), headers=ONE)).json()
                total = job["tiles"]["total"]
                assert total >= 9
                r = await asyncio.wait_for(b.client.get(f"/v1/jobs/{job['id']}/events", headers=ONE), 60)
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                got = sse(r.text)
                progress = [d["tiles"]["done"] for e, d in got if e == "progress"]
                assert progress[0] == 0 and progress == sorted(progress) and len(set(progress)) >= 3
                assert got[-1][0] == "done" and got[-1][1]["state"] == "succeeded"
                assert got[-1][1]["tiles"]["done"] == total
                assert (await a.client.get(f"/v1/jobs/{job['id']}/events", headers=TWO)).status_code == 404

                gone = (await b.client.post("/v1/jobs?scale=4", content=png(48, seed=1), headers=ONE)).json()
                stream = asyncio.create_task(a.client.get(f"/v1/jobs/{gone['id']}/events", headers=ONE))
                await b.wait(gone["id"], lambda j: j["state"] == "running", headers=ONE)
                assert (await b.client.delete(f"/v1/jobs/{gone['id']}", headers=ONE)).status_code == 200
                last = sse((await asyncio.wait_for(stream, 30)).text)[-1]
                assert last[0] == "error" and last[1]["error"]["code"] == "job_not_found"

                ma, mb = (await a.client.get("/metrics")).text, (await b.client.get("/metrics")).text
                assert metric(ma, "gendr_jobs_created_total", model="fake") == 1  # where it was admitted
                assert metric(mb, "gendr_jobs_created_total", model="fake") == 1
                both = [ma, mb]
                assert sum(metric(t, "gendr_jobs_finished_total", state="succeeded") for t in both) == 1
                assert metric(mb, "gendr_jobs_finished_total", state="cancelled") == 1  # where DELETE ran
                assert sum(metric(t, "gendr_job_queue_seconds_count") for t in both) == 2  # both started
                assert sum(metric(t, "gendr_job_run_seconds_count") for t in both) == 2
                runs = sum(metric(t, "gendr_job_run_seconds_sum") for t in both)
                assert runs >= 0.5  # first tile → finished: ~1.4 s of later batches (0.1 s per tile) at least

    run(main())


def test_events_reach_the_client_as_tiles_land_through_real_replicas(tmp_path: Path) -> None:
    """Two `gendr-serve` processes on one Redis: submitted on one, streamed from the other, each
    event arrives while the job still runs (uvicorn streams it; nothing waits for the end)."""
    with redis_server(tmp_path / "redis") as rs:
        env = {"GENDR_REDIS_URL": rs.url, "GENDR_API_KEYS": KEYS[0], "GENDR_MAX_BATCH": "1"}
        with live_server(tmp_path / "a", **env) as a, live_server(tmp_path / "b", **env) as b:
            for srv in (a, b):
                srv.hold()
            r = httpx.post(f"{a.url}/v1/jobs?scale=1", content=photo_png(120), headers=ONE, timeout=30)
            assert r.status_code == 202 and r.json()["tiles"]["total"] == 9
            stream_live(b, (a, b), r.json()["id"])


def read_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    name = data = ""
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and name:
            yield name, json.loads(data)
            name = data = ""


def stream_live(via: LiveServer, fleet: tuple[LiveServer, ...], job_id: str) -> None:
    with (
        httpx.Client(base_url=via.url, headers=ONE, timeout=30) as c,
        c.stream("GET", f"/v1/jobs/{job_id}/events") as r,
    ):
        assert r.status_code == 200
        got = read_events(r.iter_lines())
        name, first = next(got)
        assert (name, first["tiles"]["done"]) == ("progress", 0)
        for n in (1, 2):
            for srv in fleet:
                srv.hold(allow=1)  # only the replica holding the job uses it
            while True:  # a reclaim or queue-position change may add an event; wait for tile n
                name, ev = next(got)
                if ev["tiles"]["done"] == n:
                    break
            assert name == "progress" and c.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
        for srv in fleet:
            srv.release()
        rest = list(got)
        assert rest[-1][0] == "done" and rest[-1][1]["state"] == "succeeded"
