"""Which IP addresses a job's URL may reach: the public internet only, unless an allowlist says more.

Loopback, private, link-local, metadata, unspecified, multicast and reserved addresses are refused, also
inside IPv4-mapped, IPv4-compatible, 6to4 and NAT64 IPv6 forms, and in the legacy IPv4 spellings the C
library accepts (service/jobs/urls.py applies this to every resolved address and every redirect).
"""

from __future__ import annotations

import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Metadata services (AWS/GCP/Azure/OpenStack, AWS ECS, AWS IPv6, Alibaba, Azure WireServer, Oracle) are
# refused even where a wider allowlist CIDR covers them: only an entry naming the single address opens one.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    map(
        ipaddress.ip_address,
        "169.254.169.254 169.254.170.2 fd00:ec2::254 100.100.100.200 168.63.129.16 192.0.0.192".split(),
    )
)
# Ranges Python's ipaddress flags miss or treat differently across 3.11 patch releases: carrier-grade NAT,
# IETF protocol assignments, benchmarking, class E, local-use NAT64, site-local, Teredo.
_EXTRA_BLOCKED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(n), why)
    for why, nets in (
        ("unspecified", "0.0.0.0/8"),
        ("private", "100.64.0.0/10 64:ff9b:1::/48 fec0::/10"),
        ("reserved", "192.0.0.0/24 198.18.0.0/15 240.0.0.0/4 2001::/23"),
    )
    for n in nets.split()
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPAT = ipaddress.ip_network("::/96")


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton's forms, which getaddrinfo also takes: 2130706433, 0x7f.1, 017700000001, 127.1. The C
    library decides, so this agrees with what a resolution would have connected to."""
    if not host or host.strip("0123456789abcdefx.") or host[0] == ".":
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return _legacy_ipv4(host)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPAT and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_problem(ip: IPAddress) -> str | None:
    """Why an address is not public (`loopback`, `private`, `metadata` …), or None when it is."""
    if ip in METADATA_ADDRESSES:
        return "metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = embedded_ipv4(ip)
        if v4 is not None:
            if ip in _V4_COMPAT:
                return "reserved"  # IPv4-compatible IPv6 is deprecated: never public
            return address_problem(v4)
    for flag, why in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
    ):
        if getattr(ip, flag):
            return why
    for net, why in _EXTRA_BLOCKED:
        if ip.version == net.version and ip in net:
            return why
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None
