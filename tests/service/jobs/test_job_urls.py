"""A job's URLs end to end, on both stores: input from `input_url`, the result PUT to `output_url`,
signed webhooks delivered at least once to a receiver that fails first — and private addresses refused
at submission, before any work."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import redis_server
from shared_helpers import Replica, png, replica
from url_helpers import Reply, Seen, Server

standardwebhooks = pytest.importorskip("standardwebhooks")

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@contextlib.asynccontextmanager
async def one_replica(tmp: Path, shared: bool, **kw: Any) -> AsyncIterator[Replica]:
    opts = {"webhook_secret": SECRET, "url_allowlist": ["127.0.0.1"], "url_allow_http": True, **kw}
    if shared:
        with redis_server(tmp / "redis") as rs:
            async with replica(tmp / "a", rs.url, **opts) as r:
                yield r
    else:
        async with replica(tmp / "a", None, **opts) as r:  # type: ignore[arg-type]
            yield r


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "embedded"])
def test_input_url_output_url_and_a_signed_webhook(tmp_path: Path, shared: bool) -> None:
    image = png(40)

    def source(req: Seen, i: int) -> Reply:
        return Reply(200, image, {"Content-Type": "image/png"})

    def storage(req: Seen, i: int) -> Reply:
        return Reply(503) if i == 0 else Reply(200)  # presigned PUT: fails once, then stores

    def receiver(req: Seen, i: int) -> Reply:
        return Reply(500) if i == 0 else Reply(204)  # the first delivery fails

    async def main() -> None:
        with Server(source) as src, Server(storage) as out, Server(receiver) as hook:
            async with one_replica(tmp_path, shared) as r:
                q = (
                    f"/v1/jobs?scale=2&input_url={src.url}/photo.png&output_url={out.url}/bucket/key?sig=1"
                    f"&webhook_url={hook.url}/hook&webhook_events=completed,failed"
                )
                created = await r.client.post(q)
                assert created.status_code == 202, created.text
                job = await r.wait(created.json()["id"], lambda j: j["state"] == "succeeded")
                assert job["result_url"] is None and job["output"]["to_output_url"] is True
                assert "sig=1" not in json.dumps(job)  # a presigned URL is a credential: never echoed
                res = await r.client.get(f"/v1/jobs/{job['id']}/result")
                assert res.status_code == 409 and res.json()["error"]["code"] == "result_at_output_url"
                puts = [s for s in out.seen if s.method == "PUT"]
                assert len(puts) == 2 and puts[1].headers["content-type"] == "image/png"
                assert puts[1].body[:8] == b"\x89PNG\r\n\x1a\n"
                for _ in range(300):
                    if len(hook.seen) >= 2:
                        break
                    await asyncio.sleep(0.02)
                assert len(hook.seen) == 2
                first, second = hook.seen
                assert first.headers["webhook-id"] == second.headers["webhook-id"]  # receivers dedupe on it
                wh = standardwebhooks.Webhook(SECRET)
                msg = wh.verify(
                    second.body, {k: v for k, v in second.headers.items() if k.startswith("webhook-")}
                )
                assert msg["type"] == "job.completed" and msg["data"]["id"] == job["id"]
                assert msg["data"]["state"] == "succeeded"
                for _ in range(100):
                    view = (await r.client.get(f"/v1/jobs/{job['id']}")).json()
                    deliveries = view["webhook"]["deliveries"]
                    if deliveries and deliveries[-1].get("delivered"):
                        break
                    await asyncio.sleep(0.02)
                assert deliveries[-1]["delivered"] is True and deliveries[-1]["attempts"] == 2
                assert view["webhook"]["url"] == f"{hook.url}/hook"

    asyncio.run(main())


@pytest.mark.parametrize(
    "query",
    [
        "webhook_url=http://169.254.169.254/latest",
        "output_url=http://10.0.0.7/bucket",
        "webhook_url=https://[::ffff:127.0.0.1]:9/x",
        "input_url=http://192.168.1.1/a.png",
        "webhook_url=http://127.0.0.1:1/x&webhook_events=done",
    ],
)
def test_private_or_bad_job_urls_are_refused_before_any_work(tmp_path: Path, query: str) -> None:
    async def main() -> None:
        async with one_replica(tmp_path, shared=False, url_allowlist=[]) as r:
            got = await r.client.post(
                f"/v1/jobs?scale=2&{query}", content=b"" if "input_url" in query else png(32)
            )
            assert got.status_code == 400, got.text
            assert got.json()["error"]["code"] in ("url_refused", "bad_request")
            assert r.app.state.gendr.runtime.get("fake").batcher.stats()["reserved_tiles"] == 0

    asyncio.run(main())


def test_webhooks_need_a_secret_and_input_url_excludes_an_upload(tmp_path: Path) -> None:
    async def main() -> None:
        async with one_replica(tmp_path, shared=False, webhook_secret=None) as r:
            got = await r.client.post("/v1/jobs?webhook_url=http://127.0.0.1:9/x", content=png(32))
            assert got.status_code == 400 and "GENDR_WEBHOOK_SECRET" in got.json()["error"]["message"]
            both = await r.client.post("/v1/jobs?input_url=http://127.0.0.1:9/a.png", content=png(32))
            assert both.status_code == 400 and "not both" in both.json()["error"]["message"]

    asyncio.run(main())
