"""Self-verifying async job tokens."""

from __future__ import annotations

import hashlib
import hmac

from gateway.asyncpred.tokens import (
    MAX_CLOCK_SKEW_S,
    NO_OWNER,
    issue_token,
    may_be_pending,
    may_read,
    read_token,
)

KEY = b"k" * 32
NOW = 1_750_000_000.0


OWNER = "abcdefgh2345"
OTHER = "zzzzzzzz7777"


def test_issued_token_reads_back_for_its_model() -> None:
    token = issue_token(KEY, "fraud_xgb", OWNER, now=NOW)
    assert token.text.startswith(f"v2.{token.job_id}.{int(NOW)}.{OWNER}.")
    assert len(token.job_id) == 32
    assert read_token(KEY, "fraud_xgb", token.text, now=NOW + 5) == token
    unowned = issue_token(KEY, "fraud_xgb", now=NOW)
    assert read_token(KEY, "fraud_xgb", unowned.text, now=NOW).owner == NO_OWNER  # type: ignore[union-attr]


def test_only_the_owner_or_an_admin_may_read_a_job() -> None:
    token = issue_token(KEY, "fraud_xgb", OWNER, now=NOW)
    assert may_read(token, OWNER, is_admin=False)
    assert not may_read(token, OTHER, is_admin=False)
    assert not may_read(token, NO_OWNER, is_admin=False)
    assert may_read(token, OTHER, is_admin=True)
    assert may_read(token, None, is_admin=False)  # a gateway without authentication


def test_the_owner_cannot_be_swapped_in_the_token() -> None:
    token = issue_token(KEY, "fraud_xgb", OWNER, now=NOW)
    assert read_token(KEY, "fraud_xgb", token.text.replace(OWNER, OTHER), now=NOW) is None
    assert read_token(KEY, "fraud_xgb", token.text.replace(f".{OWNER}.", ".-."), now=NOW) is None


def test_v1_tokens_verify_without_an_owner_and_read_for_admins_only() -> None:
    job, issued = "a" * 32, int(NOW)
    mac = hmac.new(KEY, f"v1|fraud_xgb|{job}|{issued}".encode(), hashlib.sha256).hexdigest()
    legacy = read_token(KEY, "fraud_xgb", f"v1.{job}.{issued}.{mac[:32]}", now=NOW)
    assert legacy is not None and legacy.owner is None
    assert not may_read(legacy, OWNER, is_admin=False)
    assert may_read(legacy, OWNER, is_admin=True)


def test_job_ids_are_unique() -> None:
    assert len({issue_token(KEY, "m").job_id for _ in range(1000)}) == 1000


def test_forged_garbled_or_foreign_tokens_do_not_read() -> None:
    token = issue_token(KEY, "fraud_xgb", OWNER, now=NOW)
    version, job, issued, owner, mac = token.text.split(".")
    flipped = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    forged = [
        f"{version}.{job}.{issued}.{owner}.{flipped}",  # wrong mac
        f"{version}.{job}.{int(issued) + 1}.{owner}.{mac}",  # issue time changed
        f"{version}.{'0' * 32}.{issued}.{owner}.{mac}",  # another job id
        f"v1.{job}.{issued}.{owner}.{mac}",  # a v2 token relabelled
        f"v2.{job}.{issued}.{mac}",  # no owner
        token.text + "0",
        token.text.upper(),
        "",
        "not-a-token",
        "v1...",
    ]
    for text in forged:
        assert read_token(KEY, "fraud_xgb", text, now=NOW) is None, text
    assert read_token(KEY, "fraud_nn", token.text, now=NOW) is None  # other model
    assert read_token(b"x" * 32, "fraud_xgb", token.text, now=NOW) is None  # other secret


def test_tokens_from_the_future_do_not_read() -> None:
    token = issue_token(KEY, "m", now=NOW + MAX_CLOCK_SKEW_S + 5)
    assert read_token(KEY, "m", token.text, now=NOW) is None
    skewed = issue_token(KEY, "m", now=NOW + MAX_CLOCK_SKEW_S - 5)
    assert read_token(KEY, "m", skewed.text, now=NOW) == skewed


def test_pending_only_within_the_ttl() -> None:
    token = issue_token(KEY, "m", now=NOW)
    assert may_be_pending(token, ttl_s=60, now=NOW + 60)
    assert not may_be_pending(token, ttl_s=60, now=NOW + 61)
