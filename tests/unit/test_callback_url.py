"""Callback URL checks against server-side request forgery."""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Sequence

import pytest

from gateway.asyncpred.callback_url import (
    CallbackHostUnresolved,
    CallbackUrlRejected,
    address_problem,
    embedded_ipv4,
    parse_callback_url,
    parse_networks,
    resolve_callback,
)


class FakeDns:
    """A resolver answering from a table; unknown names fail like NXDOMAIN."""

    def __init__(self, table: dict[str, list[str]], delay_s: float = 0.0) -> None:
        self.table = table
        self.delay_s = delay_s
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if host not in self.table:
            raise OSError(-2, "Name or service not known")
        return self.table[host]


def resolve(url: str, dns: FakeDns, allowed: Sequence[str] = ()) -> list[str]:
    target = parse_callback_url(url)
    found = asyncio.run(resolve_callback(target, parse_networks(allowed), resolver=dns))
    return [str(ip) for ip in found]


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://example.com/x", "scheme must be http or https"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://example.com", "scheme"),
        ("example.com/hook", "scheme"),
        ("http://", "no host"),
        ("http://user:pw@example.com/", "user info"),
        ("http://user@example.com/", "user info"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://example.com:0/", "port 0"),
        ("http://exa mple.com/", "printable ASCII"),
        ("http://example.com/\r\nX-Injected: 1", "printable ASCII"),
        ("http://bücher.example/", "printable ASCII"),
        ("http://exa$mple.com/", "not a valid host name"),
        ("http://a..b/", "not a valid host name"),
        ("http://example.com/" + "a" * 2100, "at most 2048"),
    ],
)
def test_malformed_urls_are_rejected(url: str, match: str) -> None:
    with pytest.raises(CallbackUrlRejected, match=match):
        parse_callback_url(url)


def test_url_parts() -> None:
    t = parse_callback_url("HTTPS://Hooks.Example.com/a/b?x=1#frag")
    assert (t.scheme, t.host, t.port, t.path, t.host_header) == (
        "https", "hooks.example.com", 443, "/a/b?x=1", "hooks.example.com",
    )  # fmt: skip
    t = parse_callback_url("http://[2001:db8::1]:8080")
    assert (t.host, t.port, t.path, t.host_header) == (
        "2001:db8::1",
        8080,
        "/",
        "[2001:db8::1]:8080",
    )


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("100.64.0.1", "shared (CGNAT)"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "private"),  # documentation range
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::127.0.0.1", "loopback (embedded 127.0.0.1)"),
        ("64:ff9b::a00:1", "private (embedded 10.0.0.1)"),
        ("64:ff9b::7f00:1", "loopback (embedded 127.0.0.1)"),
        ("2002:7f00:1::", "loopback (embedded 127.0.0.1)"),  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_forbidden(address: str, kind: str) -> None:
    problem = address_problem(ipaddress.ip_address(address))
    assert problem is not None and problem.startswith(kind.split(" (")[0]), problem
    if "embedded" in kind:
        assert problem == kind


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_teredo_and_mapped_addresses_expose_their_ipv4() -> None:
    teredo = ipaddress.ip_address("2001:0:4136:e378:8000:63bf:3fff:fdd2")  # client 192.0.2.45
    assert str(embedded_ipv4(teredo)) == "192.0.2.45"
    assert address_problem(teredo) is not None
    assert str(embedded_ipv4(ipaddress.ip_address("::ffff:1.2.3.4"))) == "1.2.3.4"
    assert embedded_ipv4(ipaddress.ip_address("::1")) is None
    assert embedded_ipv4(ipaddress.ip_address("1.2.3.4")) is None


def test_allowed_networks_open_exactly_those_addresses() -> None:
    allowed = parse_networks(["127.0.0.0/8", "10.20.0.0/16", "fd00::/8"])
    assert address_problem(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert address_problem(ipaddress.ip_address("::ffff:127.0.0.1"), allowed) is None
    assert address_problem(ipaddress.ip_address("10.20.3.4"), allowed) is None
    assert address_problem(ipaddress.ip_address("fd00::5"), allowed) is None
    assert address_problem(ipaddress.ip_address("10.21.0.1"), allowed) == "private"
    assert address_problem(ipaddress.ip_address("::1"), allowed) == "loopback"


def test_names_resolving_to_private_addresses_are_rejected() -> None:
    dns = FakeDns(
        {
            "hooks.example.com": ["93.184.215.14"],
            "internal.example.com": ["10.0.0.7"],
            "rebind.example.com": ["93.184.215.14", "127.0.0.1"],  # one bad answer suffices
            "metadata.example.com": ["::ffff:169.254.169.254"],
            "v6.example.com": ["2606:4700::1", "fe80::1%eth0"],
        }
    )
    assert resolve("https://hooks.example.com/x", dns) == ["93.184.215.14"]
    for host, shown in [
        ("internal.example.com", "10.0.0.7"),
        ("rebind.example.com", "127.0.0.1"),
        ("metadata.example.com", "::ffff:a9fe:a9fe"),
        ("v6.example.com", "fe80::1"),
    ]:
        with pytest.raises(CallbackUrlRejected, match=re.escape(f"resolves to {shown}")):
            resolve(f"http://{host}/", dns)


def test_ip_literals_are_checked_without_dns() -> None:
    dns = FakeDns({})
    with pytest.raises(CallbackUrlRejected, match="loopback"):
        resolve("http://127.0.0.1:8080/", dns)
    with pytest.raises(CallbackUrlRejected, match="loopback"):
        resolve("http://[::ffff:127.0.0.1]/", dns)
    assert resolve("http://[2606:4700:4700::1111]/", dns) == ["2606:4700:4700::1111"]
    assert dns.asked == []


def test_loopback_is_allowed_when_configured() -> None:
    dns = FakeDns({"localhost": ["127.0.0.1", "::1"]})
    assert resolve("http://localhost:9000/", dns, ["127.0.0.0/8", "::1/128"]) == [
        "127.0.0.1",
        "::1",
    ]
    with pytest.raises(CallbackUrlRejected, match="::1"):
        resolve("http://localhost:9000/", dns, ["127.0.0.0/8"])


def test_unresolvable_and_slow_names_are_reported_as_such() -> None:
    with pytest.raises(CallbackHostUnresolved, match="does not resolve"):
        resolve("http://nxdomain.example/", FakeDns({}))
    with pytest.raises(CallbackHostUnresolved, match="no addresses"):
        resolve("http://empty.example/", FakeDns({"empty.example": []}))
    slow = FakeDns({"slow.example": ["8.8.8.8"]}, delay_s=1.0)
    target = parse_callback_url("http://slow.example/")
    with pytest.raises(CallbackHostUnresolved, match=r"within 0\.05s"):
        asyncio.run(resolve_callback(target, (), timeout_s=0.05, resolver=slow))


def test_numeric_host_forms_are_judged_by_what_they_resolve_to() -> None:
    # "2130706433" and "0x7f.1" are names to urlsplit but 127.0.0.1 to getaddrinfo
    dns = FakeDns({"2130706433": ["127.0.0.1"], "0x7f.1": ["127.0.0.1"]})
    for url in ("http://2130706433/", "http://0x7f.1/"):
        with pytest.raises(CallbackUrlRejected, match="loopback"):
            resolve(url, dns)
