"""GET /v1/jobs (the caller's jobs, paged), GET /v1/jobs/{id}/events (Server-Sent Events) and the job
metrics on the embedded store, through the app's HTTP stack (the real Runtime, fake backend, gated)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from jobs_helpers import jobs_app, photo_png
from wire_formats import metric, parse_sse

from service.jobs import events

KEYS = ["key-one", "key-two"]
ONE = {"Authorization": "Bearer key-one"}
TWO = {"Authorization": "Bearer key-two"}


def test_the_list_is_the_callers_jobs_newest_first_in_pages(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path, api_keys=KEYS) as j:
            j.gate.open()
            mine = []
            for i in range(5):
                r = await j.client.post("/v1/jobs?scale=1", content=photo_png(24 + i), headers=ONE)
                assert r.status_code == 202
                mine.append(r.json()["id"])
            theirs = (await j.client.post("/v1/jobs?scale=1", content=photo_png(24), headers=TWO)).json()[
                "id"
            ]

            seen, cursor, pages = [], None, 0
            while True:
                q = "/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
                r = await j.client.get(q, headers=ONE)
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["object"] == "list" and len(body["data"]) <= 2
                assert r.headers["cache-control"] == "no-store"
                seen += [d["id"] for d in body["data"]]
                pages += 1
                cursor = body["next_cursor"]
                if cursor is None:
                    break
            assert seen == mine[::-1] and pages == 3  # newest first, every job once, no other key's
            full = (await j.client.get("/v1/jobs", headers=ONE)).json()
            assert [d["id"] for d in full["data"]] == mine[::-1] and full["next_cursor"] is None
            assert {"state", "tiles", "created_at", "output"} <= set(
                full["data"][0]
            )  # the job as GET shows it
            other = (await j.client.get("/v1/jobs", headers=TWO)).json()
            assert [d["id"] for d in other["data"]] == [theirs]

            await j.client.delete(f"/v1/jobs/{mine[0]}", headers=ONE)
            left = (await j.client.get("/v1/jobs", headers=ONE)).json()
            assert mine[0] not in [d["id"] for d in left["data"]]

    asyncio.run(main())


def test_the_list_bounds_what_a_client_sends(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path, api_keys=KEYS) as j:
            for q in ("limit=0", "limit=101", "limit=x", "cursor=" + "A" * 200, "cursor=bm90IGEgY3Vyc29y"):
                r = await j.client.get(f"/v1/jobs?{q}", headers=ONE)
                assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", (q, r.text)
            assert (await j.client.get("/v1/jobs?limit=100", headers=ONE)).status_code == 200
            r = await j.client.get("/v1/jobs")
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        async with jobs_app(tmp_path / "open") as j:  # no keys: no caller to list for
            r = await j.client.get("/v1/jobs")
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            assert "API keys" in r.json()["error"]["message"]

    asyncio.run(main())


def test_events_stream_progress_as_tiles_land_then_the_final_state(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path, api_keys=KEYS) as j:
            job = (await j.client.post("/v1/jobs?scale=2", content=photo_png(56), headers=ONE)).json()
            total = job["tiles"]["total"]
            stream = asyncio.create_task(j.client.get(f"/v1/jobs/{job['id']}/events", headers=ONE))
            for n in range(1, total + 1):  # one tile at a time, each seen by the stream's poll
                j.gate.allow(1)
                await j.wait(job["id"], lambda b, n=n: b["tiles"]["done"] >= n, headers=ONE)
                await asyncio.sleep(events.LIMITS.poll_s * 1.5)
            r = await asyncio.wait_for(stream, 20)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-store"
            got = parse_sse(r.text)
            assert got[0] == ("retry", events.LIMITS.retry_ms)
            progress = [d for e, d in got if e == "progress"]
            assert progress[0]["state"] == "queued" and progress[0]["id"] == job["id"]
            done = [d["tiles"]["done"] for d in progress]
            assert done == sorted(done) and len(set(done)) >= total // 2  # tiles seen as they landed
            last_event, final = got[-1]
            assert last_event == "done" and final["state"] == "succeeded"
            assert final["tiles"] == {"done": total, "total": total} and final["result_url"]

            r = await j.client.get(f"/v1/jobs/{job['id']}/events", headers=ONE)  # already finished
            assert [e for e, _ in parse_sse(r.text)] == ["retry", "done"]
            r = await j.client.get(f"/v1/jobs/{job['id']}/events", headers=TWO)  # not their job
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
            assert (await j.client.get(f"/v1/jobs/{job['id']}/events")).status_code == 401

    asyncio.run(main())


def test_events_heartbeat_a_deleted_job_and_the_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "LIMITS", events.StreamLimits(poll_s=0.02, heartbeat_s=0.1, max_s=0.5))

    async def main() -> None:
        async with jobs_app(tmp_path) as j:
            job = (await j.client.post("/v1/jobs?scale=1", content=photo_png(40))).json()
            r = await asyncio.wait_for(j.client.get(f"/v1/jobs/{job['id']}/events"), 10)  # nothing runs
            got = parse_sse(r.text)
            assert [e for e, _ in got if e == "progress"] == ["progress"]  # the state once, then quiet
            comments = [d for e, d in got if e == "comment"]
            assert comments.count("keep-alive") >= 2 and "time limit" in comments[-1]

            stream = asyncio.create_task(j.client.get(f"/v1/jobs/{job['id']}/events"))
            await asyncio.sleep(0.1)
            assert (await j.client.delete(f"/v1/jobs/{job['id']}")).status_code == 200
            got = parse_sse((await asyncio.wait_for(stream, 10)).text)
            assert got[-1] == (
                "error",
                {"error": {"code": "job_not_found", "message": got[-1][1]["error"]["message"]}},
            )

    asyncio.run(main())


def test_job_metrics_count_created_finished_queue_and_run_time(tmp_path: Path) -> None:
    async def main() -> None:
        async with jobs_app(tmp_path) as j:
            ok = (await j.client.post("/v1/jobs?scale=2", content=photo_png(56))).json()
            gone = (await j.client.post("/v1/jobs?scale=1", content=photo_png(40))).json()
            await asyncio.sleep(0.2)  # both wait in the queue
            j.gate.allow(1)
            await j.wait(ok["id"], lambda b: b["state"] == "running")
            await j.client.delete(f"/v1/jobs/{gone['id']}")  # cancelled before it started
            j.gate.open()
            await j.wait(ok["id"], lambda b: b["state"] == "succeeded")
            text = (await j.client.get("/metrics")).text
            assert metric(text, "gendr_jobs_created_total", model="fake") == 2
            assert metric(text, "gendr_jobs_finished_total", model="fake", state="succeeded") == 1
            assert metric(text, "gendr_jobs_finished_total", model="fake", state="cancelled") == 1
            assert metric(text, "gendr_job_queue_seconds_count", model="fake") == 1  # one job started
            assert metric(text, "gendr_job_queue_seconds_sum", model="fake") >= 0.2
            assert metric(text, "gendr_job_run_seconds_count", model="fake") == 1
            again = await j.client.post(
                "/v1/jobs?scale=1", content=photo_png(40), headers={"Idempotency-Key": "k"}
            )
            await j.client.post("/v1/jobs?scale=1", content=photo_png(40), headers={"Idempotency-Key": "k"})
            await j.wait(again.json()["id"], lambda b: b["state"] == "succeeded")
            text = (await j.client.get("/metrics")).text
            assert metric(text, "gendr_jobs_created_total", model="fake") == 3  # a repeat is not a job

    asyncio.run(main())
