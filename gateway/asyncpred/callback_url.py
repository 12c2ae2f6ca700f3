"""Callback URLs and server-side request forgery: which URLs the workers may POST to.

A callback URL is checked when the job is submitted (422 naming ``callback_url``) and again
before every delivery attempt, since DNS answers change. The delivery then connects to one
of the addresses that passed the check, never resolving the name a second time, so a DNS
answer cannot change between check and connect.

Rules:

* ``http`` or ``https``, a host, no user info, ASCII only (IDN hosts in their ``xn--`` form),
  no whitespace or control characters, at most ``MAX_URL_LENGTH`` characters;
* **every** address the host resolves to must be globally routable: not loopback,
  link-local, private, shared (100.64/10), multicast, reserved, unspecified or site-local,
  also when embedded in an IPv6 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible,
  NAT64 ``64:ff9b::/96``, 6to4, Teredo);
* unless the address (or the IPv4 address embedded in it) is in one of the configured
  ``allowed_callback_networks`` (on-premises receivers, tests on loopback).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``(host, port) -> addresses``; the default asks the system resolver (getaddrinfo)
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

MAX_URL_LENGTH = 2048
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")


class CallbackUrlError(ValueError):
    """The callback URL may not be used; the message says why (without the field name)."""


class CallbackUrlRejected(CallbackUrlError):
    """Never usable: wrong form or a forbidden address. Retrying does not help."""


class CallbackHostUnresolved(CallbackUrlError):
    """The host did not resolve (now): may work on a later attempt."""


@dataclass(frozen=True)
class CallbackTarget:
    """A syntactically valid callback URL, split for the HTTP request."""

    url: str
    scheme: str
    host: str
    port: int
    #: path and query, as sent in the request line
    path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_callback_url(url: str) -> CallbackTarget:
    """Check the form of ``url`` (no DNS); raise :class:`CallbackUrlRejected`."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackUrlRejected(f"must be at most {MAX_URL_LENGTH} characters")
    if not url.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise CallbackUrlRejected(
            "must be printable ASCII without spaces (percent-encode the path, "
            "give IDN hosts in their xn-- form)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackUrlRejected(f"is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise CallbackUrlRejected(f"scheme must be http or https, not {parts.scheme!r}")
    if parts.username is not None or parts.password is not None:
        raise CallbackUrlRejected("must not contain user info (credentials)")
    host = parts.hostname or ""
    if not host:
        raise CallbackUrlRejected("has no host")
    if _ip_literal(host) is None and not (set(host) <= _HOST_CHARS and ".." not in host):
        raise CallbackUrlRejected(f"host {host!r} is not a valid host name")
    if port == 0:
        raise CallbackUrlRejected("port 0 is not a valid port")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return CallbackTarget(url, scheme, host, port or (443 if scheme == "https" else 80), path)


def parse_networks(cidrs: Sequence[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings (``10.0.0.0/8``, ``::1/128``; a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # not :: or ::1
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _forbidden_kind(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None."""
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("shared (CGNAT)", isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("non-global", not ip.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def address_problem(ip: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """None when a callback may go to ``ip``; else what kind of address it is."""
    inner = embedded_ipv4(ip)
    candidates = [ip] if inner is None else [ip, inner]
    if any(c in net for c in candidates for net in allowed if c.version == net.version):
        return None
    if inner is None:
        return _forbidden_kind(ip)
    # the IPv6 wrapper ranges (::ffff:0:0/96, 64:ff9b::/96, 2002::/16, 2001::/32) are not
    # global themselves; what the packet reaches is the IPv4 address inside
    kind = _forbidden_kind(inner)
    return None if kind is None else f"{kind} (embedded {inner})"


async def system_resolver(host: str, port: int) -> Sequence[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


async def resolve_callback(
    target: CallbackTarget,
    allowed: Sequence[IPNetwork] = (),
    *,
    timeout_s: float = 2.0,
    resolver: Resolver = system_resolver,
) -> list[IPAddress]:
    """The addresses a callback to ``target`` may connect to; all of them passed the check.

    Raises :class:`CallbackUrlRejected` if any resolved address is forbidden (a name with
    one public and one private address is refused), :class:`CallbackHostUnresolved` if the
    name does not resolve within ``timeout_s``.
    """
    literal = _ip_literal(target.host)
    if literal is not None:
        found: list[IPAddress] = [literal]
    else:
        try:
            names = await asyncio.wait_for(resolver(target.host, target.port), timeout_s)
        except asyncio.TimeoutError:
            raise CallbackHostUnresolved(
                f"host {target.host!r} did not resolve within {timeout_s:g}s"
            ) from None
        except OSError as exc:
            raise CallbackHostUnresolved(f"host {target.host!r} does not resolve: {exc}") from None
        found = []
        for name in names:
            ip = ipaddress.ip_address(name.split("%", 1)[0])  # drop an IPv6 zone id
            if ip not in found:
                found.append(ip)
        if not found:
            raise CallbackHostUnresolved(f"host {target.host!r} has no addresses")
    for ip in found:
        problem = address_problem(ip, allowed)
        if problem is not None:
            where = "is" if literal is not None else f"resolves to {ip},"
            raise CallbackUrlRejected(
                f"host {target.host} {where} a forbidden {problem} address; callbacks go to "
                "public addresses only (or allowed_callback_networks)"
            )
    return found
