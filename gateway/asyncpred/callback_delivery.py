"""POSTing a job's result to its callback URL: signed, SSRF-checked, retried with backoff.

Each attempt re-checks the URL (:mod:`gateway.asyncpred.callback_url`), resolving the host
again, and
connects to an address that passed the check, with TLS verified against the URL's host. The
request is plain HTTP/1.1 over asyncio streams (``Connection: close``); only the status line
of the answer is read. A 2xx answer is a delivery; redirects are not followed (a redirect is
a way around the address check) and count as failures, like any other status, a timeout or
a network error, and are retried after a jittered exponential backoff. A URL that is
rejected (form, or a forbidden address) fails at once: retrying cannot fix it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.asyncpred.backoff import Backoff
from gateway.asyncpred.callback_signature import (
    ATTEMPT_HEADER,
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    signature_header,
)
from gateway.asyncpred.callback_url import (
    CallbackHostUnresolved,
    CallbackTarget,
    CallbackUrlRejected,
    IPAddress,
    IPNetwork,
    Resolver,
    parse_callback_url,
    resolve_callback,
    system_resolver,
)

USER_AGENT = "rtinfer-async-callback/1"
#: interim (1xx) answers skipped before the final status line
MAX_INTERIM_RESPONSES = 5
MAX_LINE_BYTES = 8192

Outcome = Literal["delivered", "http_error", "network_error", "unresolved", "rejected"]


@dataclass(frozen=True)
class AttemptResult:
    outcome: Outcome
    detail: str
    status: int | None = None


@dataclass(frozen=True)
class DeliveryReport:
    delivered: bool
    attempts: int
    last: AttemptResult


class _BadResponse(Exception):
    """The receiver's answer is not HTTP/1.x."""


class CallbackSender:
    """Delivers callbacks for one worker; ``on_attempt(outcome)`` counts every attempt."""

    def __init__(
        self,
        *,
        secret: bytes,
        allowed_networks: Sequence[IPNetwork],
        timeout_s: float,
        dns_timeout_s: float,
        max_attempts: int,
        backoff: Backoff,
        resolver: Resolver = system_resolver,
        ssl_context: ssl.SSLContext | None = None,
        on_attempt: Callable[[Outcome], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._secret = secret
        self._allowed = tuple(allowed_networks)
        self._timeout_s = timeout_s
        self._dns_timeout_s = dns_timeout_s
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._resolver = resolver
        self._ssl = ssl_context
        self._on_attempt = on_attempt
        self._sleep = sleep

    async def deliver(self, url: str, delivery_id: str, body: bytes) -> DeliveryReport:
        """Up to ``max_attempts`` POSTs of ``body``; stops at the first 2xx or a rejected URL."""
        attempt = 0
        while True:
            attempt += 1
            result = await self.attempt(url, delivery_id, body, attempt)
            if self._on_attempt is not None:
                self._on_attempt(result.outcome)
            if result.outcome == "delivered":
                return DeliveryReport(True, attempt, result)
            if result.outcome == "rejected" or attempt >= self._max_attempts:
                return DeliveryReport(False, attempt, result)
            await self._sleep(self._backoff.delay(attempt))

    async def attempt(self, url: str, delivery_id: str, body: bytes, attempt: int) -> AttemptResult:
        """One signed POST to ``url``, after checking where it resolves to now."""
        try:
            target = parse_callback_url(url)
            addresses = await resolve_callback(
                target, self._allowed, timeout_s=self._dns_timeout_s, resolver=self._resolver
            )
        except CallbackUrlRejected as exc:
            return AttemptResult("rejected", f"callback_url {exc}")
        except CallbackHostUnresolved as exc:
            return AttemptResult("unresolved", str(exc))
        headers = {
            "Host": target.host_header,
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "Connection": "close",
            SIGNATURE_HEADER: signature_header(self._secret, body),
            DELIVERY_HEADER: delivery_id,
            ATTEMPT_HEADER: str(attempt),
        }
        head = f"POST {target.path} HTTP/1.1\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        try:
            status = await asyncio.wait_for(
                self._post(target, addresses, head.encode("ascii") + b"\r\n" + body),
                self._timeout_s,
            )
        except asyncio.TimeoutError:
            return AttemptResult("network_error", f"no answer within {self._timeout_s:g}s")
        except (
            OSError,
            _BadResponse,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as exc:
            return AttemptResult("network_error", f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return AttemptResult("delivered", f"HTTP {status}", status)
        return AttemptResult("http_error", f"HTTP {status}", status)

    async def _post(
        self, target: CallbackTarget, addresses: Sequence[IPAddress], request: bytes
    ) -> int:
        tls: ssl.SSLContext | None = None
        if target.scheme == "https":
            tls = self._ssl or ssl.create_default_context()
        error: OSError | None = None
        for ip in addresses:
            try:
                reader, writer = await asyncio.open_connection(
                    str(ip),
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls is not None else None,
                    limit=MAX_LINE_BYTES,
                )
            except OSError as exc:  # refused, unreachable: the next address may answer
                error = exc
                continue
            try:
                writer.write(request)
                await writer.drain()
                return await _read_status(reader)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        assert error is not None
        raise error


async def _read_status(reader: asyncio.StreamReader) -> int:
    """The final status code of an HTTP/1.x answer, skipping 1xx interim answers."""
    for _ in range(MAX_INTERIM_RESPONSES + 1):
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _BadResponse("status line too long") from None
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _BadResponse(f"not an HTTP/1.x status line: {line[:80]!r}")
        status = int(parts[1])
        if status >= 200 or status < 100:
            return status
        while (await reader.readuntil(b"\n")).strip():  # headers of the interim answer
            pass
    raise _BadResponse("too many interim (1xx) answers")
