"""Callback signatures: what receivers verify with ``verify_signature``."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from gateway.asyncpred.callback_signature import (
    InvalidSignature,
    compute_signature,
    signature_header,
    verify_signature,
)

SECRET = "s3cret-s3cret-s3cret"
BODY = b'{"token":"v1.abc","status":"done"}'
NOW = 1_750_000_000


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert compute_signature(SECRET, NOW, BODY) == expected
    assert signature_header(SECRET, BODY, timestamp=NOW) == f"t={NOW},v1={expected}"


def test_valid_signature_verifies_and_returns_its_timestamp() -> None:
    header = signature_header(SECRET, BODY, timestamp=NOW)
    assert verify_signature(SECRET, header, BODY, now=NOW + 10) == NOW
    assert verify_signature(SECRET.encode(), header, BODY, now=NOW - 10) == NOW


@pytest.mark.parametrize(
    ("header", "body", "secret", "match"),
    [
        (None, BODY, SECRET, "missing"),
        ("", BODY, SECRET, "missing"),
        ("garbage", BODY, SECRET, "malformed"),
        (f"v1={'0' * 64}", BODY, SECRET, "no timestamp"),
        (f"t={NOW}", BODY, SECRET, "no v1="),
        (f"t=12a,v1={'0' * 64}", BODY, SECRET, "malformed timestamp"),
        (f"t=\u00b2,v1={'0' * 64}", BODY, SECRET, "malformed timestamp"),
        (f"t={NOW},t={NOW},v1={'0' * 64}", BODY, SECRET, "malformed timestamp"),
        ("SIGNED", BODY + b" ", SECRET, "does not match"),
        ("SIGNED", BODY, "another-secret-value", "does not match"),
        (f"t={NOW},v1=\u00e9\u00e9", BODY, SECRET, "does not match"),
    ],
)
def test_bad_headers_are_rejected(header: str | None, body: bytes, secret: str, match: str) -> None:
    if header == "SIGNED":
        header = signature_header(SECRET, BODY, timestamp=NOW)
    with pytest.raises(InvalidSignature, match=match):
        verify_signature(secret, header, body, now=NOW)


def test_replay_outside_the_tolerance_is_rejected() -> None:
    header = signature_header(SECRET, BODY, timestamp=NOW)
    with pytest.raises(InvalidSignature, match="tolerance"):
        verify_signature(SECRET, header, BODY, now=NOW + 301)
    with pytest.raises(InvalidSignature, match="tolerance"):
        verify_signature(SECRET, header, BODY, now=NOW - 301)
    assert verify_signature(SECRET, header, BODY, now=NOW + 3600, tolerance_s=7200) == NOW


def test_any_of_several_v1_entries_may_match_for_secret_rotation() -> None:
    new = compute_signature("the-new-secret-value", NOW, BODY)
    old = compute_signature(SECRET, NOW, BODY)
    header = f"t={NOW},v1={new},v1={old}"
    assert verify_signature(SECRET, header, BODY, now=NOW) == NOW
    assert verify_signature("the-new-secret-value", header, BODY, now=NOW) == NOW
    # upper-case hex and spaces after commas are accepted
    assert verify_signature(SECRET, f"t={NOW}, v1={old.upper()}", BODY, now=NOW) == NOW
