"""GENDR_ROOT_PATH through a real `gendr-serve` process behind a small proxy that serves it under /gendr and
strips the prefix, as an ingress with a rewrite does: the URLs the server hands out (Location, result_url,
the web page's links, /docs) stay under the prefix, and what bypasses the proxy (probes, Prometheus, the
request metrics and the drain's count of in-flight requests) still sees the plain paths."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
from http_helpers import encode, small

PREFIX = "/gendr"
KEY = "root-path-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class StrippingProxy:
    """Forwards `PREFIX/...` to the server as `/...` (404 for anything else), whole responses at a time."""

    def __init__(self, upstream_port: int) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: object) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not (self.path == PREFIX or self.path.startswith(PREFIX + "/")):
                    self._reply(404, [("Content-Type", "text/plain")], b"not under the prefix")
                    return
                path = self.path[len(PREFIX) :] or "/"
                proxy.forwarded.append(path)
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                skip = ("host", "connection", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn.request(self.command, path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                drop = ("connection", "transfer-encoding", "content-length", "date", "server")
                self._reply(
                    resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in drop], data
                )
                conn.close()

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _any

        self.forwarded: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, StrippingProxy]]:
    from live_server import live_server

    with live_server(tmp_path_factory.mktemp("root-path"), GENDR_ROOT_PATH=PREFIX, GENDR_API_KEYS=KEY) as srv:
        proxy = StrippingProxy(srv.port)
        try:
            yield srv, proxy
        finally:
            proxy.close()


def _finished(client: httpx.Client, location: str) -> dict[str, Any]:
    end = time.monotonic() + 30
    while True:
        job = client.get(location, headers=AUTH).json()
        if job["state"] not in ("queued", "running"):
            return job
        assert time.monotonic() < end, job
        time.sleep(0.05)


def test_the_web_page_and_its_files_under_the_prefix(served: tuple[Any, StrippingProxy]) -> None:
    _, proxy = served
    page_url = f"{proxy.url}{PREFIX}"  # without the trailing slash, as a user types it
    page = httpx.get(page_url)
    assert page.status_code == 200 and f'<base href="{PREFIX}/">' in page.text
    links = re.findall(r'(?:href|src)="([^"]+)"', page.text)
    assert links and not [u for u in links if u.startswith("/") and not u.startswith(PREFIX + "/")], links
    base = urljoin(page_url, f"{PREFIX}/")  # what the browser resolves against: the <base href>
    for link in ("static/app.js", "static/style.css", "docs"):
        assert link in links or link == "docs"
        r = httpx.get(urljoin(base, link))
        assert r.status_code == 200, (link, r.status_code)
    # The script asks the API by relative paths (resolved against the <base>), never "/v1/..." literally.
    script = httpx.get(urljoin(base, "static/app.js")).text
    assert not re.search(r"""["'`]/v1/""", script)
    assert "v1/jobs" in script and "v1/models" in script
    assert httpx.get(urljoin(base, "v1/models")).status_code == 200
    # Swagger UI loads the schema from under the prefix.
    docs = httpx.get(urljoin(base, "docs")).text
    assert f"{PREFIX}/openapi.json" in docs
    assert httpx.get(f"{proxy.url}{PREFIX}/openapi.json").status_code == 200


def test_location_and_result_url_carry_the_prefix(served: tuple[Any, StrippingProxy]) -> None:
    _, proxy = served
    png = encode(small("astronaut.png", 40))
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        headers = {**AUTH, "Content-Type": "image/png", "Idempotency-Key": "root-path-1"}
        r = client.post(f"{PREFIX}/v1/jobs", content=png, headers=headers)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.headers["location"] == f"{PREFIX}/v1/jobs/{job_id}"
        job = _finished(client, r.headers["location"])  # followed as a client follows it: from the origin
        assert job["state"] == "succeeded", job
        assert job["result_url"] == f"{PREFIX}/v1/jobs/{job_id}/result"
        result = client.get(job["result_url"], headers=AUTH)
        assert result.status_code == 200 and result.headers["content-type"] == "image/png"

        listed = client.get(f"{PREFIX}/v1/jobs", headers=AUTH).json()["data"]
        assert [j["result_url"] for j in listed if j["id"] == job_id] == [job["result_url"]]
        events = client.get(f"{PREFIX}/v1/jobs/{job_id}/events", headers=AUTH).text
        done = [json.loads(line[5:]) for line in events.splitlines() if line.startswith("data:")]
        assert done[-1]["result_url"] == job["result_url"]
        # The same key and body again: the same job, its Location and result_url under the prefix too.
        again = client.post(f"{PREFIX}/v1/jobs", content=png, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == job_id
        assert again.headers["location"] == r.headers["location"]
        assert again.json()["result_url"] == job["result_url"]


def test_plain_paths_still_work_where_the_proxy_is_bypassed(served: tuple[Any, StrippingProxy]) -> None:
    srv, proxy = served
    assert httpx.get(f"{srv.url}/readyz").status_code == 200  # kubelet probes, Prometheus: no proxy
    before = srv.metric("gendr_requests_total", model="fake", status="200")
    png = encode(small("astronaut.png", 40))
    r = httpx.post(
        f"{proxy.url}{PREFIX}/upscale", content=png, headers={**AUTH, "Content-Type": "image/png"}, timeout=30
    )
    assert r.status_code == 200, r.text
    # /upscale is still seen as /upscale by the request metrics (and the drain's in-flight count).
    assert srv.metric("gendr_requests_total", model="fake", status="200") == before + 1
    assert httpx.get(f"{proxy.url}/v1/models").status_code == 404  # the proxy serves the prefix only


def test_root_path_setting_is_validated() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    assert Settings(root_path="/a/b-c").root_path == "/a/b-c"
    for bad in ("gendr", "/gendr/", "/a b", "//x"):
        with pytest.raises(ValidationError):
            Settings(root_path=bad)


def test_keep_alive_outlasts_common_load_balancer_idle_timeouts() -> None:
    """ingress-nginx's upstream keepalive and AWS ALB's idle timeout are 60 s: ours must be longer, so they,
    not we, close an idle pooled connection (else: 502 on a request sent as we close)."""
    from service.settings import Settings

    assert Settings.model_fields["keep_alive_timeout_s"].default > 60


def test_unprefixed_server_answers_plain_urls(tmp_path: Path) -> None:
    from live_server import live_server

    with live_server(tmp_path) as srv:
        page = httpx.get(f"{srv.url}/").text
        assert '<base href="/">' in page and 'src="static/app.js"' in page
        r = httpx.post(
            f"{srv.url}/v1/jobs",
            content=encode(small("astronaut.png", 40)),
            headers={"Content-Type": "image/png"},
        )
        assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            job = _finished(client, r.headers["location"])
        assert job["result_url"] == f"/v1/jobs/{job['id']}/result"
