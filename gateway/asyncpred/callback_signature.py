"""Signatures of async-prediction callbacks, and their verification for receivers.

Every callback POST carries::

    X-RTInfer-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}." + raw body)>
    X-RTInfer-Delivery: <job id>           the same for every attempt of one job: dedupe on it
    X-RTInfer-Attempt: <n>                 1 for the first attempt

The timestamp is signed with the body, so a captured request cannot be replayed later than
the receiver's tolerance. A receiver verifies the *raw* body bytes, before parsing them::

    from gateway.asyncpred.callback_signature import InvalidSignature, verify_signature

    try:
        verify_signature(secret, request.headers["X-RTInfer-Signature"], raw_body)
    except InvalidSignature:
        return 400

This module uses only the standard library, so receivers can copy it as it is.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-RTInfer-Signature"
DELIVERY_HEADER = "X-RTInfer-Delivery"
ATTEMPT_HEADER = "X-RTInfer-Attempt"
SCHEME = "v1"
#: default replay window of :func:`verify_signature`, seconds either side of now
DEFAULT_TOLERANCE_S = 300.0


class InvalidSignature(ValueError):
    """The signature header is missing, malformed, stale or does not match the body."""


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def compute_signature(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp}."`` followed by the raw body."""
    return hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-RTInfer-Signature`` value for ``body``, signed now unless ``timestamp`` is given."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},{SCHEME}={compute_signature(secret, t, body)}"


def verify_signature(
    secret: str | bytes,
    header: str | None,
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> int:
    """Check ``header`` against ``body``; return its timestamp, or raise :class:`InvalidSignature`.

    The timestamp must be within ``tolerance_s`` of ``now`` (default: the current time). Any
    of several ``v1=`` entries may match (a sender rotating secrets signs with each).
    Comparison is constant-time.
    """
    if not header:
        raise InvalidSignature(f"missing {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise InvalidSignature(f"malformed {SIGNATURE_HEADER} element {part.strip()!r}")
        if name == "t":
            if timestamp is not None or not (value.isascii() and value.isdigit()):
                raise InvalidSignature(f"malformed timestamp in {SIGNATURE_HEADER}")
            timestamp = int(value)
        elif name == SCHEME:
            candidates.append(value)
    if timestamp is None:
        raise InvalidSignature(f"no timestamp (t=) in {SIGNATURE_HEADER}")
    if not candidates:
        raise InvalidSignature(f"no {SCHEME}= signature in {SIGNATURE_HEADER}")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise InvalidSignature(
            f"timestamp {timestamp} is outside the {tolerance_s:g}s tolerance (replay?)"
        )
    expected = compute_signature(secret, timestamp, body).encode()
    # check every candidate, so timing does not reveal which one matched
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate.lower().encode(errors="replace"))
    if not matched:
        raise InvalidSignature("signature does not match the body")
    return timestamp
