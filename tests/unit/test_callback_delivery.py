"""Callback POSTs against a real HTTP server on loopback: signing, pinning, retries."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gateway.asyncpred.backoff import Backoff
from gateway.asyncpred.callback_delivery import CallbackSender, DeliveryReport
from gateway.asyncpred.callback_signature import verify_signature
from gateway.asyncpred.callback_url import parse_networks

SECRET = b"unit-test-callback-secret"
BODY = json.dumps({"token": "v1.x", "status": "done"}).encode()
LOOPBACK = parse_networks(["127.0.0.0/8"])


class Receiver:
    """Answers each POST with the next status of ``statuses`` (the last one repeats)."""

    def __init__(self, statuses: Sequence[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((self.path, dict(self.headers), body))
                status = receiver.statuses[min(len(receiver.requests), len(statuses)) - 1]
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", "http://169.254.169.254/")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    r = Receiver(getattr(request, "param", [200]))
    yield r
    r.close()


class Dns:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        if host not in self.table:
            raise OSError("no such host")
        return self.table[host]


def sender(
    dns: Dns | None = None, attempts: int = 3, timeout_s: float = 2.0
) -> tuple[CallbackSender, list[float], list[str]]:
    sleeps: list[float] = []
    outcomes: list[str] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    return (
        CallbackSender(
            secret=SECRET,
            allowed_networks=LOOPBACK,
            timeout_s=timeout_s,
            dns_timeout_s=1.0,
            max_attempts=attempts,
            backoff=Backoff(1.0, 8.0),
            resolver=dns or Dns({}),
            on_attempt=outcomes.append,
            sleep=sleep,
        ),
        sleeps,
        outcomes,
    )


def deliver(s: CallbackSender, url: str) -> DeliveryReport:
    return asyncio.run(s.deliver(url, "job-1234", BODY))


def test_delivery_is_signed_and_goes_to_the_checked_address(receiver: Receiver) -> None:
    # the name exists only in the fake DNS: the request must go to the address it checked
    s, sleeps, outcomes = sender(Dns({"hooks.internal": ["127.0.0.1"]}))
    report = deliver(s, f"http://hooks.internal:{receiver.port}/cb?x=1")
    assert report.delivered and report.attempts == 1 and report.last.status == 200
    assert (sleeps, outcomes) == ([], ["delivered"])
    [(path, headers, body)] = receiver.requests
    assert path == "/cb?x=1"
    assert body == BODY
    assert headers["Host"] == f"hooks.internal:{receiver.port}"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-RTInfer-Delivery"] == "job-1234"
    assert headers["X-RTInfer-Attempt"] == "1"
    verify_signature(SECRET, headers["X-RTInfer-Signature"], body)


@pytest.mark.parametrize("receiver", [[500, 503, 200]], indirect=True)
def test_failures_are_retried_with_backoff_until_delivered(receiver: Receiver) -> None:
    s, sleeps, outcomes = sender(attempts=5)
    report = deliver(s, f"http://127.0.0.1:{receiver.port}/")
    assert report.delivered and report.attempts == 3
    assert outcomes == ["http_error", "http_error", "delivered"]
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 1.0 and 0 <= sleeps[1] <= 2.0
    assert [h["X-RTInfer-Attempt"] for _, h, _ in receiver.requests] == ["1", "2", "3"]
    assert len({h["X-RTInfer-Delivery"] for _, h, _ in receiver.requests}) == 1
    for _, headers, body in receiver.requests:
        verify_signature(SECRET, headers["X-RTInfer-Signature"], body)


@pytest.mark.parametrize("receiver", [[500]], indirect=True)
def test_delivery_gives_up_after_max_attempts(receiver: Receiver) -> None:
    s, sleeps, outcomes = sender(attempts=3)
    report = deliver(s, f"http://127.0.0.1:{receiver.port}/")
    assert not report.delivered and report.attempts == 3
    assert outcomes == ["http_error"] * 3
    assert (report.last.outcome, report.last.status) == ("http_error", 500)
    assert len(receiver.requests) == 3 and len(sleeps) == 2


@pytest.mark.parametrize("receiver", [[302]], indirect=True)
def test_redirects_are_not_followed(receiver: Receiver) -> None:
    s, _, outcomes = sender(attempts=2)
    report = deliver(s, f"http://127.0.0.1:{receiver.port}/")
    assert not report.delivered and outcomes == ["http_error", "http_error"]
    assert len(receiver.requests) == 2  # only the receiver was called


def test_an_address_that_became_private_is_rejected_without_retry(receiver: Receiver) -> None:
    # accepted at submit time, the name now resolves to a private address (DNS rebinding)
    s, sleeps, outcomes = sender(Dns({"hooks.example.com": ["10.0.0.8"]}))
    report = deliver(s, "https://hooks.example.com/cb")
    assert not report.delivered and report.attempts == 1 and sleeps == []
    assert outcomes == ["rejected"]
    assert "10.0.0.8" in report.last.detail and report.last.detail.startswith("callback_url")
    s, _, outcomes = sender(attempts=3)
    assert deliver(s, f"http://[::1]:{receiver.port}/").last.outcome == "rejected"
    assert receiver.requests == []


def test_unresolvable_hosts_and_refused_connections_are_retried() -> None:
    s, sleeps, outcomes = sender(attempts=2)
    assert not deliver(s, "http://gone.example/").delivered
    assert outcomes == ["unresolved", "unresolved"] and len(sleeps) == 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        s, _, outcomes = sender(attempts=2)
        report = deliver(s, f"http://127.0.0.1:{port}/")
    assert outcomes == ["network_error", "network_error"]
    assert "Connect" in report.last.detail or "refused" in report.last.detail


def test_a_receiver_that_never_answers_times_out() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        s, _, outcomes = sender(attempts=1, timeout_s=0.3)
        report = deliver(s, f"http://127.0.0.1:{sock.getsockname()[1]}/")
    assert outcomes == ["network_error"]
    assert "no answer within 0.3s" in report.last.detail
