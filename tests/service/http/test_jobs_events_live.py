"""GET /v1/jobs/{id}/events through a real `gendr-serve` process (uvicorn): each event reaches the client
while the job is still running, not buffered until the end; the stream ends after the final state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from live_server import LiveServer, live_server, photo_png

KEY = "events-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) as each event's blank line arrives; comments and `retry:` are skipped."""
    name, data = "", ""
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and name:
            yield name, json.loads(data)
            name, data = "", ""


def watch(srv: LiveServer, job_id: str, headers: dict[str, str]) -> None:
    """Let one tile through at a time and see each land on the open stream before the next."""
    with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as c:
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            stream = events(r.iter_lines())
            name, first = next(stream)
            assert (name, first["state"], first["tiles"]["done"]) == ("progress", "queued", 0)
            total = first["tiles"]["total"]
            for n in (1, 2):
                srv.hold(allow=1)
                name, ev = next(stream)
                assert (name, ev["tiles"]["done"]) == ("progress", n)
                now = c.get(f"/v1/jobs/{job_id}").json()
                assert now["state"] == "running" and now["tiles"]["done"] == n  # live, not replayed
            srv.release()
            rest = list(stream)  # ends by itself after the final event
            assert rest[-1][0] == "done" and rest[-1][1]["state"] == "succeeded"
            assert rest[-1][1]["tiles"] == {"done": total, "total": total}
            assert all(name == "progress" for name, _ in rest[:-1])


def test_events_arrive_as_tiles_land_through_uvicorn(tmp_path: Path) -> None:
    with live_server(tmp_path, GENDR_API_KEYS=KEY, GENDR_MAX_BATCH="1") as srv:
        srv.hold()
        r = httpx.post(f"{srv.url}/v1/jobs?scale=1", content=photo_png(120), headers=AUTH, timeout=30)
        assert r.status_code == 202 and r.json()["tiles"]["total"] == 9
        watch(srv, r.json()["id"], AUTH)
