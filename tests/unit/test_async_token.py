"""Self-verifying async job tokens."""

from __future__ import annotations

from gateway.async_token import MAX_CLOCK_SKEW_S, issue_token, may_be_pending, read_token

KEY = b"k" * 32
NOW = 1_750_000_000.0


def test_issued_token_reads_back_for_its_model() -> None:
    token = issue_token(KEY, "fraud_xgb", now=NOW)
    assert token.text.startswith(f"v1.{token.job_id}.{int(NOW)}.")
    assert len(token.job_id) == 32
    assert read_token(KEY, "fraud_xgb", token.text, now=NOW + 5) == token


def test_job_ids_are_unique() -> None:
    assert len({issue_token(KEY, "m").job_id for _ in range(1000)}) == 1000


def test_forged_garbled_or_foreign_tokens_do_not_read() -> None:
    token = issue_token(KEY, "fraud_xgb", now=NOW)
    version, job, issued, mac = token.text.split(".")
    flipped = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    forged = [
        f"{version}.{job}.{issued}.{flipped}",  # wrong mac
        f"{version}.{job}.{int(issued) + 1}.{mac}",  # issue time changed
        f"{version}.{'0' * 32}.{issued}.{mac}",  # another job id
        f"v2.{job}.{issued}.{mac}",
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
