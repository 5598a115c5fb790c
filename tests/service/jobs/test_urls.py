"""SSRF-safe fetch and upload of a job's URLs (service/jobs/urls.py), against real loopback servers.

Refusals are proven without a connection: an `AcceptCounter` listens where the refused URL points and
must count zero, and a tripwire fails any connect() to a non-loopback address. Allowed traffic only ever
goes to servers the test started, opened by an explicit allowlist.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator

import pytest
from url_helpers import AcceptCounter, Reply, Seen, Server, no_outside_connections, table_resolver

from service.errors import ImageTooLarge
from service.jobs.urls import (
    UrlFetchFailed,
    UrlPolicy,
    UrlRefused,
    address_problem,
    check_url,
    fetch,
    put,
)


@pytest.fixture(autouse=True)
def tripwire(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    with no_outside_connections(monkeypatch) as attempts:
        yield attempts
    assert attempts == [], f"a connection left loopback: {attempts}"


@pytest.fixture(scope="module")
def counter() -> Iterator[AcceptCounter]:
    with AcceptCounter() as c:
        yield c


def allow(*servers: Server, **kw: object) -> UrlPolicy:
    return UrlPolicy(allow_http=True, allowlist=tuple(f"127.0.0.1:{s.port}" for s in servers), **kw)  # type: ignore[arg-type]


REFUSED = [
    "http://127.0.0.1:{p}/",
    "http://localhost:{p}/",
    "http://[::1]:{p}/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1:{p}/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://100.100.100.200/",
    "http://0.0.0.0:{p}/",
    "http://[::]:{p}/",
    "http://[::ffff:127.0.0.1]:{p}/",
    "http://[::ffff:7f00:1]:{p}/",
    "http://[::127.0.0.1]:{p}/",
    "http://[2002:7f00:1::]:{p}/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fd00:ec2::254]/",
    "http://[ff02::1]/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://2130706433:{p}/",
    "http://0x7f.1:{p}/",
    "http://0x7f000001:{p}/",
    "http://017700000001:{p}/",
    "http://127.1:{p}/",
    "http://0:{p}/",
    "http://127.0.0.1.:{p}/",
]


@pytest.mark.parametrize("template", REFUSED)
def test_private_addresses_are_refused_before_connecting(template: str, counter: AcceptCounter) -> None:
    before = counter.accepts
    url = template.format(p=counter.port)
    with pytest.raises(UrlRefused) as err:
        asyncio.run(fetch(url, UrlPolicy(allow_http=True), 1024))
    assert err.value.status == 400 and err.value.code == "url_refused"
    assert "not allowed" in err.value.message
    time.sleep(0.05)  # an accept would have been counted by now
    assert counter.accepts == before


@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1"], ["93.184.216.34", "10.0.0.1"], ["2606:2800:220:1::", "::1"], ["::ffff:169.254.169.254"]],
)
def test_a_name_resolving_to_a_private_address_is_refused(
    addresses: list[str], counter: AcceptCounter
) -> None:
    policy = UrlPolicy(allow_http=True, resolver=table_resolver({"evil.test": addresses}))
    with pytest.raises(UrlRefused, match=r"evil\.test resolves to"):
        asyncio.run(fetch(f"http://evil.test:{counter.port}/x", policy, 1024))
    with pytest.raises(UrlRefused):
        asyncio.run(put(f"http://evil.test:{counter.port}/x", b"x", "image/png", policy))
    time.sleep(0.05)
    assert counter.accepts == 0


def test_public_names_pass_the_check_which_connects_to_nothing() -> None:
    policy = UrlPolicy(
        resolver=table_resolver({"cdn.test": ["93.184.216.34", "2606:2800:220:1::", "93.184.216.34"]})
    )
    r = asyncio.run(check_url("https://CDN.test/a.png?sig=1", policy))
    assert r.host == "cdn.test" and r.port == 443
    assert [str(a) for a in r.addresses] == ["93.184.216.34", "2606:2800:220:1::"]  # deduplicated, in order
    assert r.extensions() == {"sni_hostname": "cdn.test"}
    assert str(r.url_for(r.addresses[1])) == "https://[2606:2800:220:1::]/a.png?sig=1"


@pytest.mark.parametrize("ip", ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_have_no_problem(ip: str) -> None:
    assert address_problem(ipaddress.ip_address(ip)) is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://cdn.test/a.png", "only https"),
        ("ftp://cdn.test/a.png", "only https"),
        ("file:///etc/passwd", "only https"),
        ("https://user:pw@cdn.test/a.png", "credentials"),
        ("https://cdn.test@127.0.0.1/a.png", "credentials"),
        ("not a url", "only https"),
        ("https://" + "a" * 9000, "longer than"),
    ],
)
def test_scheme_userinfo_and_shape_are_refused(url: str, why: str) -> None:
    policy = UrlPolicy(resolver=table_resolver({"cdn.test": ["93.184.216.34"]}))
    with pytest.raises(UrlRefused, match=why):
        asyncio.run(check_url(url, policy))


def test_the_allowlist_opens_exactly_what_it_names() -> None:
    res = table_resolver({"minio.internal": ["10.1.2.3"], "localhost": ["127.0.0.1", "::1"]})

    def ok(url: str, *allowlist: str) -> bool:
        try:
            asyncio.run(check_url(url, UrlPolicy(allow_http=True, allowlist=allowlist, resolver=res)))
            return True
        except UrlRefused:
            return False

    assert ok("http://127.0.0.1:9000/", "127.0.0.1:9000") and not ok(
        "http://127.0.0.1:9001/", "127.0.0.1:9000"
    )
    assert ok("http://127.0.0.1:9001/", "127.0.0.1/32") and not ok("http://127.0.0.2/", "127.0.0.1/32")
    assert ok("http://[::ffff:127.0.0.1]:5/", "127.0.0.1")  # the mapped form of an allowed address
    assert ok("http://localhost:8080/", "localhost") and not ok("http://localhost:8080/", "localhost:80")
    assert ok("http://minio.internal:9000/b", "10.0.0.0/8") and ok("http://minio.internal/", "*.internal")
    assert ok("http://[::1]:80/", "[::1]:80") and not ok("http://[::1]:81/", "[::1]:80")
    # Metadata stays shut under a wide range or a name; only its exact address opens it.
    assert not ok("http://169.254.169.254/", "169.254.0.0/16")
    assert ok("http://169.254.169.254/", "169.254.169.254")


@pytest.mark.parametrize("entry", ["", "10.0.0.0/33", "host:port", "a b", "[::1", "127.0.0.1:70000"])
def test_a_malformed_allowlist_entry_fails_at_start_up(entry: str) -> None:
    with pytest.raises(ValueError, match="url_allowlist entry"):
        UrlPolicy(allowlist=(entry,))


def test_policy_from_settings() -> None:
    from service.settings import Settings

    s = Settings(url_allowlist=["10.0.0.0/8"], url_allow_http=True, url_timeout_s=7.0)
    p = UrlPolicy.from_settings(s, max_redirects=1)
    assert (p.allow_http, p.allowlist, p.timeout_s, p.max_redirects) == (True, ("10.0.0.0/8",), 7.0, 1)


def test_redirects_are_followed_within_the_allowlist() -> None:
    with Server(Reply(body=b"final bytes")) as b:
        location = f"{b.url}/final"

        def a_handler(req: Seen, i: int) -> Reply:
            if req.path == "/start":
                return Reply(302, headers={"Location": "/hop"})  # relative: same server
            return Reply(307, headers={"Location": location})

        with Server(a_handler) as a:
            assert asyncio.run(fetch(f"{a.url}/start", allow(a, b), 1024)) == b"final bytes"
            assert [r.path for r in a.seen] == ["/start", "/hop"]
            assert [r.path for r in b.seen] == ["/final"]
            assert b.seen[0].headers["host"] == f"127.0.0.1:{b.port}"


@pytest.mark.parametrize(
    "target", ["http://169.254.169.254/latest/meta-data/", "counter", "http://[::1]:{p}/"]
)
def test_a_redirect_out_of_the_allowlist_is_refused(target: str, counter: AcceptCounter) -> None:
    before = counter.accepts
    location = f"http://127.0.0.1:{counter.port}/" if target == "counter" else target.format(p=counter.port)
    with Server(Reply(302, headers={"Location": location})) as a:
        with pytest.raises(UrlRefused, match="not allowed"):
            asyncio.run(fetch(f"{a.url}/x", allow(a), 1024))
        assert len(a.seen) == 1
    time.sleep(0.05)
    assert counter.accepts == before


def test_a_redirect_loop_stops_after_max_redirects() -> None:
    with Server(Reply(301, headers={"Location": "/again"})) as a:
        with pytest.raises(UrlRefused, match="more than 2 redirects"):
            asyncio.run(fetch(a.url, allow(a, max_redirects=2), 1024))
        assert len(a.seen) == 3


def test_fetch_caps_bytes_from_the_header_and_while_reading() -> None:
    with Server(Reply(body=b"x" * 100, declared_length=10_000)) as a:
        with pytest.raises(ImageTooLarge, match="larger than 1000 bytes"):
            asyncio.run(fetch(a.url, allow(a), 1000))
    with Server(Reply(chunks=[b"y" * 400] * 5)) as a:
        with pytest.raises(ImageTooLarge) as err:
            asyncio.run(fetch(a.url, allow(a), 1000))
        assert err.value.status == 413
        assert asyncio.run(fetch(a.url, allow(a), 2000)) == b"y" * 2000  # exactly the cap passes


def test_fetch_has_one_time_limit_for_the_whole_operation() -> None:
    slow_head = Reply(body=b"late", delay_s=30)
    trickle = Reply(chunks=[b"z"] * 300, chunk_delay_s=0.05)  # every read is quick, the whole is not
    for reply in (slow_head, trickle):
        with Server(reply) as a:
            t0 = time.monotonic()
            with pytest.raises(UrlFetchFailed) as err:
                asyncio.run(fetch(a.url, allow(a, timeout_s=0.5), 1 << 20))
            assert time.monotonic() - t0 < 10  # nowhere near the server's 30 s / 15 s
            assert err.value.status == 422 and err.value.code == "url_fetch_failed"


def test_fetch_reports_the_status_and_the_host_only() -> None:
    with Server(Reply(404, body=b"secret internal page")) as a:
        with pytest.raises(UrlFetchFailed) as err:
            asyncio.run(fetch(f"{a.url}/missing", allow(a), 1024))
    assert err.value.message == f"input_url: 127.0.0.1:{a.port} answered HTTP 404"
    closed = Server(Reply())
    closed.httpd.server_close()  # a port nobody listens on
    with pytest.raises(UrlFetchFailed, match="could not connect"):
        asyncio.run(fetch(closed.url, allow(closed), 1024))


def test_https_goes_to_the_checked_address_with_the_real_name_in_sni_and_host() -> None:
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("files.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    resolver = table_resolver({"files.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})

    def handler(req: Seen, i: int) -> Reply:
        if req.path == "/down":  # a downgrade to plain http is refused like any other bad URL
            return Reply(302, headers={"Location": req.headers["host"].join(["http://", "/img"])})
        return Reply(body=b"over tls")

    with Server(handler, tls=server_ctx) as a:
        policy = UrlPolicy(allowlist=("files.test", "other.test"), resolver=resolver, ssl_context=client_ctx)
        assert asyncio.run(fetch(f"https://files.test:{a.port}/img", policy, 1024)) == b"over tls"
        assert a.sni == ["files.test"] and a.seen[0].headers["host"] == f"files.test:{a.port}"
        with pytest.raises(UrlFetchFailed):  # the certificate is for files.test, not other.test
            asyncio.run(fetch(f"https://other.test:{a.port}/img", policy, 1024))
        assert len(a.seen) == 1
        with pytest.raises(UrlRefused, match="only https"):
            asyncio.run(fetch(f"https://files.test:{a.port}/down", policy, 1024))
        assert len(a.seen) == 2


def _flaky(first: int, *, times: int = 1) -> tuple[list[bytes], object]:
    stored: list[bytes] = []

    def handler(req: Seen, i: int) -> Reply:
        if i < times:
            return Reply(first)
        stored.append(req.body)
        return Reply(200)

    return stored, handler


@pytest.mark.parametrize("first", [503, 429])
def test_put_retries_a_transient_failure_and_stores_the_bytes_once(first: int) -> None:
    stored, handler = _flaky(first)
    body = bytes(range(256)) * 40
    with Server(handler) as a:  # type: ignore[arg-type]
        asyncio.run(
            put(
                f"{a.url}/bucket/key.png?X-Amz-Signature=abc",
                body,
                "image/png",
                allow(a),
                backoff_base_s=0.01,
            )
        )
        assert stored == [body]
        assert len(a.seen) == 2
        last = a.seen[-1]
        assert last.method == "PUT" and last.path == "/bucket/key.png?X-Amz-Signature=abc"
        assert last.headers["content-type"] == "image/png" and last.headers["content-length"] == str(
            len(body)
        )
        assert "x-ms-blob-type" not in last.headers


def test_put_does_not_retry_a_client_error() -> None:
    stored, handler = _flaky(403, times=10)
    with Server(handler) as a:  # type: ignore[arg-type]
        with pytest.raises(UrlFetchFailed, match="HTTP 403") as err:
            asyncio.run(put(f"{a.url}/k", b"data", "image/webp", allow(a), backoff_base_s=0.01))
        assert len(a.seen) == 1 and stored == []
    assert err.value.status == 422


def test_put_gives_up_after_its_attempts() -> None:
    with Server(Reply(500)) as a:
        with pytest.raises(UrlFetchFailed, match="HTTP 500"):
            asyncio.run(put(f"{a.url}/k", b"data", "image/png", allow(a), attempts=3, backoff_base_s=0.01))
        assert len(a.seen) == 3


def test_put_to_azure_sends_the_blob_type_and_the_real_host() -> None:
    name = "acct.blob.core.windows.net"
    with Server(Reply(201)) as a:
        policy = UrlPolicy(allow_http=True, allowlist=(name,), resolver=table_resolver({name: ["127.0.0.1"]}))
        asyncio.run(put(f"http://{name}:{a.port}/c/out.jpg?sv=2024&sig=x", b"jpeg", "image/jpeg", policy))
        h = a.seen[0].headers
        assert h["x-ms-blob-type"] == "BlockBlob" and h["host"] == f"{name}:{a.port}"
        assert h["content-type"] == "image/jpeg" and a.seen[0].body == b"jpeg"
