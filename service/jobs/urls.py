"""Outbound HTTP for a job's URLs (input_url, output_url, webhook_url), safe against SSRF.

A client names a URL and our pod fetches it: without care that reaches the cloud metadata service,
the cluster's private services or the pod's own loopback. So every URL is checked the way
docs/jobs.md describes: https only (http by setting), no userinfo, the host resolved once and every
address refused when it is loopback, private, link-local, metadata, unspecified, multicast or
reserved (also inside IPv4-mapped, IPv4-compatible, 6to4 and NAT64 IPv6 forms), unless an allowlist
setting names the host or the address. The request then goes to the checked address itself (no
second resolution a DNS rebinding could change), with the real name in `Host` and in TLS SNI, so the
certificate is still verified for the name. Redirects are followed by hand and each hop is checked
again; bytes and time are capped. No proxy from the environment is used: a proxy resolves names
itself, which would undo the check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import httpx

from service.errors import ImageTooLarge, ServiceError
from service.jobs.addresses import IPAddress, address_problem, embedded_ipv4, literal_ip

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_URL_CHARS = 8192
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class UrlRefused(ServiceError):
    """A URL the service will not reach: a client mistake, so a 4xx, never retried."""

    status, code = 400, "url_refused"


class UrlFetchFailed(ServiceError):
    """The remote answered an error, or could not be reached in time. The message names the host and
    the status only: nothing about our network leaks back to the client."""

    status, code = 422, "url_fetch_failed"


async def resolve_host(host: str, port: int) -> list[str]:
    """The system resolver (getaddrinfo), off the event loop's thread."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@cache
def _default_ssl_context() -> ssl.SSLContext:
    # One context for the process: building one loads the CA bundle (tens of ms).
    return httpx.create_ssl_context()


@dataclass(frozen=True)
class _Rule:
    host: str | None = None  # exact name, or ".suffix" for a "*.suffix" entry
    net: IPNetwork | None = None
    port: int | None = None

    def matches_host(self, host: str, port: int) -> bool:
        if self.host is None or self.port not in (None, port):
            return False
        return host.endswith(self.host) if self.host.startswith(".") else host == self.host

    def matches_ip(self, ip: IPAddress, port: int, *, exact: bool = False) -> bool:
        if self.net is None or self.port not in (None, port) or (exact and self.net.num_addresses != 1):
            return False
        return ip.version == self.net.version and ip in self.net


def _parse_rule(entry: str) -> _Rule:
    """One allowlist entry: `host`, `*.domain`, `host:port`, an IP, `ip:port`, `[v6]:port` or a CIDR."""
    e = entry.strip().lower().rstrip(".")
    try:
        if not e.startswith("[") and ("/" in e or e.count(":") > 1):
            return _Rule(net=ipaddress.ip_network(e, strict=False))
        if e.startswith("["):
            inner, sep, rest = e[1:].partition("]")
            name, port_s = (inner, rest[1:]) if sep and rest[:1] in ("", ":") else ("", "x")
        else:
            name, _, port_s = e.partition(":")
        port = int(port_s) if port_s else None
        if port is not None and not 0 < port < 65536:
            raise ValueError
        try:
            return _Rule(net=ipaddress.ip_network(name), port=port)
        except ValueError:
            pass
        host = name[1:] if name.startswith("*.") else name
        if e.startswith("[") or not host.strip(".") or not all(c.isalnum() or c in "-._" for c in host):
            raise ValueError
        return _Rule(host=host, port=port)
    except ValueError:
        raise ValueError(
            f"url_allowlist entry {entry!r}: use a host, *.domain, host:port, an IP, ip:port or a CIDR"
        ) from None


@dataclass(frozen=True)
class UrlPolicy:
    """What a job's URLs may reach. `resolver` is a hook: tests make a name resolve to chosen addresses;
    `ssl_context` is None for the system's CA bundle."""

    allow_http: bool = False
    allowlist: tuple[str, ...] = ()
    timeout_s: float = 30.0
    max_redirects: int = 3
    resolver: Resolver = field(default=resolve_host, compare=False, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    _rules: tuple[_Rule, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Parsed once, here: a bad entry fails at start-up, not at a client's first job.
        object.__setattr__(self, "_rules", tuple(_parse_rule(e) for e in self.allowlist))
        if self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError("timeout_s must be > 0 and max_redirects >= 0")

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> UrlPolicy:
        kw: dict[str, Any] = dict(
            allow_http=bool(getattr(settings, "url_allow_http", False)),
            allowlist=tuple(getattr(settings, "url_allowlist", None) or ()),
            timeout_s=float(getattr(settings, "url_timeout_s", 30.0)),
        )
        return cls(**(kw | overrides))

    def host_allowed(self, host: str, port: int) -> bool:
        return any(r.matches_host(host, port) for r in self._rules)

    def ip_allowed(self, ip: IPAddress, port: int, *, exact: bool = False) -> bool:
        return any(r.matches_ip(ip, port, exact=exact) for r in self._rules)


@dataclass(frozen=True)
class Resolved:
    """A checked URL: connect to `addresses` (in order), never to a fresh resolution of `host`."""

    url: httpx.URL
    host: str  # as sent in Host and SNI (IDNA, lower case)
    port: int
    addresses: tuple[IPAddress, ...]

    @property
    def host_header(self) -> str:
        return self.url.netloc.decode("ascii")

    def url_for(self, ip: IPAddress) -> httpx.URL:
        return self.url.copy_with(host=str(ip), fragment=None)

    def extensions(self) -> dict[str, Any]:
        if self.url.scheme == "https" and literal_ip(self.host) is None:
            return {"sni_hostname": self.host}
        return {}


def _permitted(ip: IPAddress, host: str, port: int, policy: UrlPolicy) -> bool:
    why = address_problem(ip)
    if why is None:
        return True
    inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    candidates = [ip] if inner is None else [ip, inner]
    if why == "metadata":
        return any(policy.ip_allowed(a, port, exact=True) for a in candidates)
    return policy.host_allowed(host, port) or any(policy.ip_allowed(a, port) for a in candidates)


def _parse(url: str, label: str) -> httpx.URL:
    if len(url) > MAX_URL_CHARS:
        raise UrlRefused(f"{label}: longer than {MAX_URL_CHARS} characters")
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise UrlRefused(f"{label}: not a valid URL") from None


async def check_url(url: str | httpx.URL, policy: UrlPolicy, *, label: str = "url") -> Resolved:
    """Parse, resolve once and check a URL; raise `UrlRefused` before any connection is made."""
    u = url if isinstance(url, httpx.URL) else _parse(url, label)
    schemes = ("https", "http") if policy.allow_http else ("https",)
    if u.scheme not in schemes:
        raise UrlRefused(f"{label}: only {' or '.join(schemes)} URLs are accepted")
    if u.userinfo:
        raise UrlRefused(f"{label}: credentials in the URL are not accepted")
    host = u.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise UrlRefused(f"{label}: the URL has no host")
    port = u.port or _DEFAULT_PORTS[u.scheme]
    literal = literal_ip(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            found = await policy.resolver(host, port)
        except (OSError, UnicodeError):
            raise UrlFetchFailed(f"{label}: could not resolve {host}") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(a.split("%", 1)[0]) for a in found))
        if not addresses:
            raise UrlFetchFailed(f"{label}: could not resolve {host}")
    for ip in addresses:
        if not _permitted(ip, host, port, policy):
            what = "is" if literal is not None else "resolves to"
            raise UrlRefused(f"{label}: {host} {what} a {address_problem(ip)} address, which is not allowed")
    return Resolved(url=u, host=host, port=port, addresses=tuple(addresses))


async def _send_checked(
    method: str,
    target: Resolved,
    policy: UrlPolicy,
    headers: Mapping[str, str],
    content: bytes | None,
    label: str,
) -> tuple[httpx.AsyncClient, httpx.Response]:
    """Send to the checked addresses in turn (the next one only when a connection fails). A client per
    hop: a pooled TLS connection verified for one name is never reused for another."""
    for ip in target.addresses:
        client = httpx.AsyncClient(
            trust_env=False,
            verify=policy.ssl_context or _default_ssl_context(),
            timeout=policy.timeout_s,
            follow_redirects=False,
        )
        try:
            request = client.build_request(
                method,
                target.url_for(ip),
                headers={**headers, "Host": target.host_header},
                content=content,
                extensions=target.extensions(),
            )
            return client, await client.send(request, stream=True)
        except BaseException as e:
            await client.aclose()
            if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
                continue  # try the next checked address
            if isinstance(e, httpx.TimeoutException):
                raise UrlFetchFailed(f"{label}: {target.host} did not answer in time") from None
            if isinstance(e, httpx.HTTPError):
                raise UrlFetchFailed(f"{label}: the connection to {target.host} failed") from None
            raise
    raise UrlFetchFailed(f"{label}: could not connect to {target.host}")


@asynccontextmanager
async def open_response(
    method: str,
    url: str,
    policy: UrlPolicy,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    follow_redirects: bool = True,
    label: str = "url",
) -> AsyncIterator[httpx.Response]:
    """A streamed response from a checked URL, redirects followed by hand (each hop checked again).
    GET follows every redirect; other methods only 307/308, which keep the method and body."""
    current = _parse(url, label)
    hdrs = dict(headers or {})
    for _ in range(policy.max_redirects + 1):
        target = await check_url(current, policy, label=label)
        client, resp = await _send_checked(method, target, policy, hdrs, content, label)
        try:
            status = resp.status_code
            follow = method in ("GET", "HEAD") or status in (307, 308)
            if not (follow_redirects and follow and status in _REDIRECTS):
                yield resp
                return
            location = resp.headers.get("location")
            if not location:
                raise UrlFetchFailed(f"{label}: {target.host} answered HTTP {status} without a Location")
            try:
                current = target.url.join(location)
            except (httpx.InvalidURL, ValueError):
                raise UrlRefused(f"{label}: {target.host} redirected to an invalid URL") from None
        finally:
            await resp.aclose()
            await client.aclose()
    raise UrlRefused(f"{label}: more than {policy.max_redirects} redirects")


async def fetch(url: str, policy: UrlPolicy, max_bytes: int, *, label: str = "input_url") -> bytes:
    """GET a URL's body: at most `max_bytes` (counted while reading), within `policy.timeout_s` in all."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            async with open_response(
                "GET", url, policy, headers={"Accept-Encoding": "identity"}, label=label
            ) as resp:
                host = resp.request.headers.get("host", "the host")
                if not 200 <= resp.status_code < 300:
                    raise UrlFetchFailed(f"{label}: {host} answered HTTP {resp.status_code}")
                too_big = f"{label}: the body is larger than {max_bytes} bytes"
                length = resp.headers.get("content-length", "")
                if length.isdigit() and int(length) > max_bytes:
                    raise ImageTooLarge(too_big)
                buf = bytearray()
                try:
                    async for chunk in resp.aiter_bytes():
                        buf += chunk
                        if len(buf) > max_bytes:
                            raise ImageTooLarge(too_big)
                except httpx.TimeoutException:
                    raise UrlFetchFailed(f"{label}: {host} did not answer in time") from None
                except httpx.HTTPError:
                    raise UrlFetchFailed(f"{label}: reading the body from {host} failed") from None
                return bytes(buf)
    except TimeoutError:
        raise UrlFetchFailed(
            f"{label}: no complete answer from {_parse(url, label).host} within {policy.timeout_s:g} s"
        ) from None


def backoff_s(attempt: int, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential back-off with full jitter: uniform in [0, min(cap, base × 2^(attempt-1))]."""
    return rand() * min(cap_s, base_s * 2.0 ** min(attempt - 1, 62))


async def put(
    url: str,
    body: bytes,
    content_type: str,
    policy: UrlPolicy,
    attempts: int = 3,
    *,
    label: str = "output_url",
    backoff_base_s: float = 0.5,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """PUT the bytes (a presigned S3, GCS or Azure URL). 5xx, 429, timeouts and connection errors are
    retried with back-off, up to `attempts` tries; another 4xx or a refused URL is final."""
    host = _parse(url, label).host
    headers = {"Content-Type": content_type}
    if host.lower().endswith(".blob.core.windows.net"):  # Azure Blob wants the blob type
        headers["x-ms-blob-type"] = "BlockBlob"
    error = UrlFetchFailed(f"{label}: could not upload to {host}")
    for attempt in range(1, max(1, attempts) + 1):
        if attempt > 1:
            await sleep(backoff_s(attempt - 1, backoff_base_s, 30.0))
        try:
            async with asyncio.timeout(policy.timeout_s):
                async with open_response("PUT", url, policy, headers=headers, content=body, label=label) as r:
                    status, host = r.status_code, r.request.headers.get("host", host)
        except TimeoutError:
            error = UrlFetchFailed(f"{label}: {host} did not answer within {policy.timeout_s:g} s")
            continue
        except UrlFetchFailed as e:
            error = e
            continue
        if 200 <= status < 300:
            return
        error = UrlFetchFailed(f"{label}: {host} answered HTTP {status}")
        if status != 429 and status < 500:
            raise error
    raise error
