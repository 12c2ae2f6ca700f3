"""Pure logic of API-key auth and rate limiting: tokens, hashes, headers, caches, rounding."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.auth.credentials import (
    ApiKey,
    AuthUnavailable,
    InvalidApiKey,
    MalformedToken,
    MissingCredentials,
    extract_token,
    format_token,
    hash_secret,
    new_token,
    parse_token,
    verify_secret,
)
from gateway.auth.keys import VerificationCache
from gateway.auth.ratelimit import RateLimited, RedisRateLimiter, burst_for, retry_after_seconds
from gateway.errors import GatewayError, as_gateway_error, error_response

#: cheap scrypt for tests; production parameters are checked once below
FAST = {"n": 2**4, "r": 1, "p": 1}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- tokens --------------------------------------------------------------------------------


def test_new_token_round_trips_and_is_unique() -> None:
    key_id, secret, token = new_token()
    assert token == format_token(key_id, secret) == f"rti_{key_id}_{secret}"
    assert len(key_id) == 12 and key_id.isalnum() and key_id == key_id.lower()
    assert len(secret) == 43  # 32 bytes, urlsafe base64 without padding
    assert parse_token(token) == (key_id, secret)
    assert len({new_token()[2] for _ in range(200)}) == 200


def test_secret_may_contain_underscores() -> None:
    secret = "_" * 10 + "a-b_c" + "Z" * 28
    assert parse_token(format_token("abcdefgh2345", secret)) == ("abcdefgh2345", secret)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "nope",
        "rti_abcdefgh2345",  # no secret
        "rti_abcdefgh2345_" + "a" * 42,  # secret too short
        "rti_abcdefgh2345_" + "a" * 44,  # too long
        "rti_abcdefgh234_" + "a" * 43,  # key id too short
        "rti_ABCDEFGH2345_" + "a" * 43,  # key id is lowercase base32
        "rti_abcdefgh2301_" + "a" * 43,  # 0 and 1 are not base32
        "sk_abcdefgh2345_" + "a" * 43,  # wrong prefix
        "rti_abcdefgh2345_" + "a" * 42 + "=",  # padding is stripped
        " rti_abcdefgh2345_" + "a" * 43,
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(MalformedToken) as err:
        parse_token(token)
    assert (err.value.status, err.value.code) == (401, "malformed_api_key")


# -- hashes --------------------------------------------------------------------------------


def test_hash_verifies_the_secret_only() -> None:
    encoded = hash_secret("s3cret", **FAST)
    assert verify_secret("s3cret", encoded)
    assert not verify_secret("s3cret!", encoded)
    assert not verify_secret("", encoded)


def test_hash_format_and_per_key_salt() -> None:
    first, second = hash_secret("same"), hash_secret("same")
    scheme, n, r, p, salt, digest = first.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(salt) == 22 and len(digest) == 43  # 16 and 32 bytes
    assert first != second and first.split("$")[4] != second.split("$")[4]
    assert "same" not in first
    assert verify_secret("same", first) and verify_secret("same", second)


def test_parameters_are_read_from_the_stored_hash() -> None:
    weak, strong = hash_secret("x", n=2**4, r=1, p=1), hash_secret("x", n=2**6, r=2, p=1)
    assert weak.startswith("scrypt$16$1$1$") and strong.startswith("scrypt$64$2$1$")
    assert verify_secret("x", weak) and verify_secret("x", strong)


@pytest.mark.parametrize(
    "encoded",
    [
        "sha256:" + "0" * 64,
        "scrypt$16$1$1$salt",  # missing field
        "scrypt$x$1$1$c2FsdA$aGFzaA",  # n not a number
        "scrypt$15$1$1$c2FsdA$aGFzaA",  # n not a power of two
        "scrypt$1048576$8$1$c2FsdA$aGFzaA",  # 1 GiB of memory
        "scrypt$16$1$1$$aGFzaA",  # empty salt
        "scrypt$16$1$1$c2FsdA$!!",  # not base64
    ],
)
def test_foreign_or_corrupt_hashes_are_errors_not_matches(encoded: str) -> None:
    with pytest.raises(ValueError):
        verify_secret("anything", encoded)


# -- headers -------------------------------------------------------------------------------

TOKEN = format_token("abcdefgh2345", "a" * 43)


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": f"Bearer {TOKEN}"},
        {"Authorization": f"bearer  {TOKEN} "},
        {"x-api-key": TOKEN},
        {"X-API-Key": f" {TOKEN}"},
        # another scheme is left for a proxy; the key comes from X-API-Key
        {"Authorization": "Basic dXNlcjpwdw==", "X-API-Key": TOKEN},
    ],
)
def test_token_from_either_header(headers: dict[str, str]) -> None:
    assert extract_token(headers) == TOKEN


def test_bearer_wins_over_x_api_key() -> None:
    assert extract_token({"Authorization": f"Bearer {TOKEN}", "X-API-Key": "other"}) == TOKEN


def test_missing_and_malformed_credentials_say_different_things() -> None:
    with pytest.raises(MissingCredentials) as missing:
        extract_token({"Content-Type": "application/json", "X-API-Key": "  "})
    with pytest.raises(MalformedToken) as basic:
        extract_token({"Authorization": "Basic dXNlcjpwdw=="})
    with pytest.raises(MalformedToken) as empty:
        extract_token({"Authorization": "Bearer "})
    assert missing.value.code == "missing_api_key" and "Bearer" in missing.value.message
    assert "'Basic'" in basic.value.message
    assert "empty bearer token" in empty.value.message
    assert {missing.value.status, basic.value.status} == {401}
    assert missing.value.headers == {"WWW-Authenticate": 'Bearer realm="rtinfer"'}
    assert InvalidApiKey().message == "invalid API key"


@pytest.mark.parametrize(
    ("err", "status", "code", "header"),
    [
        (MissingCredentials(), 401, "missing_api_key", ("www-authenticate", "Bearer")),
        (InvalidApiKey(), 401, "invalid_api_key", ("www-authenticate", "Bearer")),
        (AuthUnavailable(), 503, "auth_unavailable", ("retry-after", "1")),
        (RateLimited(5, 1.2), 429, "rate_limited", ("retry-after", "2")),
    ],
)
def test_the_gateway_error_handler_renders_auth_and_rate_errors(
    err: GatewayError, status: int, code: str, header: tuple[str, str]
) -> None:
    assert as_gateway_error(err) is err  # typed: not turned into a 500
    response = error_response(err, "req-1")
    assert response.status_code == status
    assert json.loads(response.body) == {"error": {"code": code, "message": err.message}}
    name, value = header
    assert value in response.headers[name]


# -- verification cache --------------------------------------------------------------------

KEY = ApiKey("abcdefgh2345", "demo", False, 5.0)


def test_verified_key_is_cached_for_the_ttl() -> None:
    clock = FakeClock()
    cache = VerificationCache(ttl_s=60, negative_ttl_s=5, clock=clock)
    cache.put_valid(b"d1", KEY)
    clock.now += 59.9
    assert cache.get_valid(b"d1") == KEY
    clock.now += 0.1
    assert cache.get_valid(b"d1") is None


def test_rejected_token_is_cached_briefly() -> None:
    clock = FakeClock()
    cache = VerificationCache(ttl_s=60, negative_ttl_s=5, clock=clock)
    cache.put_invalid(b"bad")
    assert cache.is_known_invalid(b"bad") and cache.get_valid(b"bad") is None
    clock.now += 5
    assert not cache.is_known_invalid(b"bad")


def test_a_new_result_replaces_the_opposite_one() -> None:
    cache = VerificationCache(clock=FakeClock())
    cache.put_invalid(b"d")
    cache.put_valid(b"d", KEY)
    assert not cache.is_known_invalid(b"d") and cache.get_valid(b"d") == KEY
    cache.put_invalid(b"d")
    assert cache.is_known_invalid(b"d") and cache.get_valid(b"d") is None


def test_cache_is_bounded_lru() -> None:
    cache = VerificationCache(max_entries=2, clock=FakeClock())
    cache.put_valid(b"a", KEY)
    cache.put_valid(b"b", KEY)
    assert cache.get_valid(b"a") == KEY  # a is now the most recently used
    cache.put_valid(b"c", KEY)
    assert cache.get_valid(b"b") is None
    assert cache.get_valid(b"a") == KEY and cache.get_valid(b"c") == KEY


# -- rate limiting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0, 1), (0.2, 1), (1.0, 1), (1.0000000001, 1), (1.01, 2), (2.5, 3), (59.99, 60)],
)
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(seconds: float, header: int) -> None:
    assert retry_after_seconds(seconds) == header
    err = RateLimited(5, seconds)
    assert (err.status, err.code, err.retry_after) == (429, "rate_limited", header)
    assert err.headers == {"Retry-After": str(header)}
    assert "5 requests/s" in err.message


@pytest.mark.parametrize(
    ("rate", "multiplier", "burst"), [(5, 2, 10), (0.1, 2, 1), (100, 1.5, 150), (0.5, 1, 1)]
)
def test_burst_is_a_multiple_of_the_rate_but_at_least_one(
    rate: float, multiplier: float, burst: float
) -> None:
    assert burst_for(rate, multiplier) == burst


class DeadRedis:
    """Stands in for a redis.asyncio client whose server is gone."""

    def __init__(self) -> None:
        self.calls = 0

    async def evalsha(self, *args: object) -> list[bytes]:
        self.calls += 1
        raise RedisConnectionError("Connection refused")


def test_dead_redis_fails_open_and_the_breaker_stops_calling_it() -> None:
    clock, redis = FakeClock(), DeadRedis()
    limiter = RedisRateLimiter(
        redis,  # type: ignore[arg-type]
        breaker_failure_threshold=3,
        breaker_reset_timeout_s=1.0,
        clock=clock,
    )

    async def burst(n: int) -> list[bool]:
        return [(await limiter.acquire("k", 5)).allowed for _ in range(n)]

    assert asyncio.run(burst(10)) == [True] * 10
    assert redis.calls == 3  # then the breaker opened
    assert (limiter.stats.redis_errors, limiter.stats.failed_open) == (3, 10)
    clock.now += 1.0
    asyncio.run(burst(2))
    assert redis.calls == 4  # one half-open trial, which failed: open again
    assert limiter.stats.failed_open == 12


def test_unlimited_keys_skip_redis_and_bad_costs_are_refused() -> None:
    redis = DeadRedis()
    limiter = RedisRateLimiter(redis)  # type: ignore[arg-type]
    decision = asyncio.run(limiter.acquire("k", None))
    assert decision.allowed and decision.remaining == math.inf and redis.calls == 0
    with pytest.raises(ValueError, match="cost"):
        asyncio.run(limiter.acquire("k", 5, cost=11))  # more than the burst of 10
    with pytest.raises(ValueError, match="rate_per_s"):
        asyncio.run(limiter.acquire("k", 0))
