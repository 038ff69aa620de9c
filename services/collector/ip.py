"""The client's IP address: where it comes from, and its anonymization.

Anonymization follows the common analytics practice (Google Analytics'
anonymize_ip, Matomo's two-byte option): the last octet of an IPv4 address
and the last 80 bits of an IPv6 address are zeroed, which keeps the network
(country/ISP-level geography) and drops the host.
"""
from __future__ import annotations

import ipaddress
from functools import lru_cache

_V4_MASK = 0xFFFFFF00
_V6_MASK = ((1 << 128) - 1) ^ ((1 << 80) - 1)


@lru_cache(maxsize=65536)
def anonymize_ip(ip: str) -> str | None:
    """The address with its host part zeroed; None when `ip` is not an address
    (the caller then drops it rather than store something unknown)."""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if addr.version == 4:
        return str(ipaddress.IPv4Address(int(addr) & _V4_MASK))
    mapped = addr.ipv4_mapped  # type: ignore[union-attr]
    if mapped is not None:
        return str(ipaddress.IPv4Address(int(mapped) & _V4_MASK))
    return str(ipaddress.IPv6Address(int(addr) & _V6_MASK))


def client_ip(forwarded_for: str | None, remote: str | None, trusted_proxies: int) -> str | None:
    """The client's address, with `trusted_proxies` proxies of ours in front.

    Each proxy appends the address it received the request from to X-Forwarded-For,
    so only the last `trusted_proxies` entries were written by us; the one the
    outermost of them wrote (`trusted_proxies` from the right) is the client.
    Anything left of it is whatever the client sent and is never believed. With no
    trusted proxy, or a header shorter than the chain (the request bypassed it),
    the peer address."""
    if trusted_proxies <= 0 or not forwarded_for:
        return remote
    hops = [h.strip() for h in forwarded_for.split(",")]
    if len(hops) < trusted_proxies or not hops[-trusted_proxies]:
        return remote
    return hops[-trusted_proxies]
