"""API-key auth against a real PostgreSQL and per-key rate limiting against a real Redis."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from typer.testing import CliRunner

from gateway.auth.credentials import (
    ApiKey,
    AuthError,
    AuthUnavailable,
    InvalidApiKey,
    MalformedToken,
    MissingCredentials,
    parse_token,
)
from gateway.auth.key_store import create_api_key, revoke_api_key
from gateway.auth.keys import ApiKeyAuthenticator
from gateway.auth.ratelimit import RateLimited, RedisRateLimiter
from gateway.catalog.dsn import dsn
from gateway.catalog.migrate import apply_migrations
from rtinfer.apikeys import apikeys_app
from rtinfer.postgres_server import start_postgres, stop_postgres
from rtinfer.procs import ManagedProcess, free_port
from rtinfer.redis_server import start_redis
from rtinfer.stack import ServiceState, StackState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass
class Pg:
    data_dir: Path
    port: int
    proc: ManagedProcess

    @property
    def conninfo(self) -> str:
        return dsn(self.data_dir, self.port).conninfo

    def restart(self) -> None:
        stop_postgres(self.proc)
        self.proc = start_postgres(self.data_dir, self.port)


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    # not tmp_path: pytest's 0700 base dir is not reachable by the postgres OS user (as root)
    with tempfile.TemporaryDirectory(prefix="rtinfer-auth-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


@pytest.fixture(scope="module")
def pg(state_dir: Path) -> Iterator[Pg]:
    # laid out like a stack's state dir so `rtinfer apikeys` can find it without --conninfo
    data_dir, port = state_dir / "postgres", free_port()
    server = Pg(data_dir, port, start_postgres(data_dir, port))
    try:
        apply_migrations(server.conninfo)
        yield server
    finally:
        stop_postgres(server.proc)


@pytest.fixture(scope="module")
def redis_url(state_dir: Path) -> Iterator[str]:
    port = free_port()
    proc = start_redis(state_dir / "redis", port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def outcome(auth: ApiKeyAuthenticator, headers: dict[str, str]) -> ApiKey | AuthError:
    try:
        return await auth.authenticate(headers)
    except AuthError as exc:
        return exc


# -- authentication ------------------------------------------------------------------------


def test_created_key_authenticates_with_either_header(pg: Pg) -> None:
    key, token = create_api_key(pg.conninfo, "svc-a", rate_limit_per_s=5)
    assert key == ApiKey(parse_token(token)[0], "svc-a", False, 5.0)

    async def go() -> list[ApiKey | AuthError]:
        async with ApiKeyAuthenticator(pg.conninfo) as auth:
            return [
                await outcome(auth, bearer(token)),
                await outcome(auth, {"x-api-key": token}),
                await outcome(auth, {"X-API-Key": token}),
            ]

    assert asyncio.run(go()) == [key, key, key]


def test_admin_flag_and_unlimited_rate_come_from_the_row(pg: Pg) -> None:
    key, token = create_api_key(pg.conninfo, "ops", is_admin=True)

    async def go() -> ApiKey | AuthError:
        async with ApiKeyAuthenticator(pg.conninfo) as auth:
            return await outcome(auth, {"X-API-Key": token})

    assert asyncio.run(go()) == ApiKey(key.key_id, "ops", True, None)


def test_rejections_are_401_and_missing_differs_from_invalid(pg: Pg) -> None:
    key, token = create_api_key(pg.conninfo, "svc-b")
    key_id, secret = parse_token(token)
    wrong_secret = f"rti_{key_id}_{secret[::-1]}"
    unknown_key = f"rti_{'a' * 12}_{secret}"

    async def go() -> dict[str, ApiKey | AuthError]:
        async with ApiKeyAuthenticator(pg.conninfo) as auth:
            return {
                "missing": await outcome(auth, {}),
                "malformed": await outcome(auth, bearer("rti_not-a-key")),
                "wrong secret": await outcome(auth, bearer(wrong_secret)),
                "unknown": await outcome(auth, {"X-API-Key": unknown_key}),
                "good": await outcome(auth, bearer(token)),
            }

    got = asyncio.run(go())
    assert got["good"] == key
    assert isinstance(got["missing"], MissingCredentials)
    assert isinstance(got["malformed"], MalformedToken)
    assert isinstance(got["wrong secret"], InvalidApiKey)
    assert isinstance(got["unknown"], InvalidApiKey)
    errors = [got[k] for k in ("missing", "malformed", "wrong secret", "unknown")]
    assert all(isinstance(e, AuthError) and e.status == 401 for e in errors)
    missing, malformed, wrong, unknown = (str(e) for e in errors)
    assert wrong == unknown == "invalid API key"  # nothing tells which part was wrong
    assert len({missing, malformed, wrong}) == 3
    assert "missing API key" in missing and "malformed API key" in malformed


def test_plaintext_secret_is_never_stored(pg: Pg) -> None:
    key, token = create_api_key(pg.conninfo, "svc-c", rate_limit_per_s=2.5)
    _, secret = parse_token(token)
    with psycopg.connect(pg.conninfo) as conn:
        row = conn.execute(
            "SELECT t::text, key_hash FROM api_keys t WHERE key_id = %s", (key.key_id,)
        ).fetchone()
    assert row is not None
    whole_row, key_hash = row
    assert secret not in whole_row and token not in whole_row
    assert key_hash.startswith("scrypt$16384$8$1$")


def test_hash_is_verified_once_then_served_from_cache(pg: Pg) -> None:
    _, token = create_api_key(pg.conninfo, "svc-d")
    _, other = create_api_key(pg.conninfo, "svc-e")

    async def go() -> ApiKeyAuthenticator:
        async with ApiKeyAuthenticator(pg.conninfo) as auth:
            first = await auth.authenticate(bearer(token))
            assert await auth.authenticate({"X-API-Key": token}) == first
            # concurrent requests with an uncached token share one lookup and one hash
            results = await asyncio.gather(*(auth.authenticate(bearer(other)) for _ in range(8)))
            assert len(set(results)) == 1
            return auth

    stats = asyncio.run(go()).stats
    assert stats.hash_verifications == 2
    assert stats.db_lookups == 2
    assert stats.cache_hits == 1


def test_rejected_token_is_not_hashed_again_within_negative_ttl(pg: Pg) -> None:
    _, token = create_api_key(pg.conninfo, "svc-f")
    key_id, secret = parse_token(token)
    wrong = bearer(f"rti_{key_id}_{secret[:-1]}{'B' if secret[-1] != 'B' else 'C'}")

    async def go() -> ApiKeyAuthenticator:
        async with ApiKeyAuthenticator(pg.conninfo, negative_ttl_s=30) as auth:
            concurrent = await asyncio.gather(*(outcome(auth, wrong) for _ in range(3)))
            assert all(isinstance(e, InvalidApiKey) for e in concurrent)
            assert len({id(e) for e in concurrent}) == 3  # one error object per request
            for _ in range(4):
                assert isinstance(await outcome(auth, wrong), InvalidApiKey)
            return auth

    stats = asyncio.run(go()).stats
    assert (stats.hash_verifications, stats.db_lookups, stats.negative_cache_hits) == (1, 1, 4)


def test_revoked_key_stops_working_after_the_cache_ttl(pg: Pg) -> None:
    key, token = create_api_key(pg.conninfo, "svc-g")
    ttl = 0.5

    async def go() -> None:
        async with ApiKeyAuthenticator(pg.conninfo, cache_ttl_s=ttl) as auth:
            assert await auth.authenticate(bearer(token)) == key
            assert revoke_api_key(pg.conninfo, key.key_id) is True
            assert revoke_api_key(pg.conninfo, key.key_id) is False
            # documented bound: a gateway that verified the key keeps it for up to the TTL
            assert await auth.authenticate(bearer(token)) == key
            await asyncio.sleep(ttl + 0.1)
            assert isinstance(await outcome(auth, bearer(token)), InvalidApiKey)
        async with ApiKeyAuthenticator(pg.conninfo) as fresh:
            assert isinstance(await outcome(fresh, bearer(token)), InvalidApiKey)

    asyncio.run(go())


def test_postgres_outage_keeps_cached_keys_and_503s_the_rest(pg: Pg) -> None:
    cached_key, cached = create_api_key(pg.conninfo, "svc-h")
    later_key, later = create_api_key(pg.conninfo, "svc-i")
    unknown = f"rti_{'b' * 12}_{parse_token(cached)[1]}"

    async def go() -> None:
        async with ApiKeyAuthenticator(pg.conninfo, lookup_timeout_s=0.5) as auth:
            assert await auth.authenticate(bearer(cached)) == cached_key
            stop_postgres(pg.proc)
            try:
                assert await auth.authenticate(bearer(cached)) == cached_key
                for token in (later, unknown):
                    started = time.monotonic()
                    err = await outcome(auth, bearer(token))
                    assert isinstance(err, AuthUnavailable), err
                    assert (err.status, err.code) == (503, "auth_unavailable")
                    assert time.monotonic() - started < 2.0
                assert auth.stats.db_errors == 2
            finally:
                pg.proc = start_postgres(pg.data_dir, pg.port)
            # the pool reconnects on its own
            deadline = time.monotonic() + 20
            while isinstance(got := await outcome(auth, bearer(later)), AuthUnavailable):
                assert time.monotonic() < deadline, "auth did not recover after postgres restart"
                await asyncio.sleep(0.2)
            assert got == later_key

    asyncio.run(go())


def test_postgres_down_at_start_is_503_not_a_crash() -> None:
    conninfo = f"host=127.0.0.1 port={free_port()} user=x dbname=x password=x"

    async def go() -> AuthError | ApiKey:
        async with ApiKeyAuthenticator(conninfo, lookup_timeout_s=0.3) as auth:
            return await outcome(auth, bearer(f"rti_{'c' * 12}_{'d' * 43}"))

    assert isinstance(asyncio.run(go()), AuthUnavailable)


# -- rate limiting -------------------------------------------------------------------------


def test_burst_then_refuse_then_refill(redis_url: str) -> None:
    async def go() -> None:
        limiter = RedisRateLimiter.from_url(redis_url)
        try:
            decisions = [await limiter.acquire("k-burst", 5) for _ in range(10)]
            assert all(d.allowed for d in decisions)
            assert decisions[-1].remaining < 1
            with pytest.raises(RateLimited) as refused:
                await limiter.enforce("k-burst", 5)
            assert refused.value.status == 429
            assert refused.value.retry_after >= 1
            assert refused.value.headers["Retry-After"] == str(refused.value.retry_after)
            denied = await limiter.acquire("k-burst", 5)
            assert not denied.allowed and 0 < denied.retry_after_s <= 0.2
            await asyncio.sleep(denied.retry_after_s + 0.02)
            assert (await limiter.acquire("k-burst", 5)).allowed
            assert not (await limiter.acquire("k-burst", 5)).allowed
            assert (limiter.stats.allowed, limiter.stats.limited) == (11, 3)
        finally:
            await limiter.close()

    asyncio.run(go())


def test_two_limiters_share_one_bucket(redis_url: str) -> None:
    async def go() -> None:
        a, b = RedisRateLimiter.from_url(redis_url), RedisRateLimiter.from_url(redis_url)
        try:
            assert all([(await a.acquire("k-shared", 5)).allowed for _ in range(6)])
            assert all([(await b.acquire("k-shared", 5)).allowed for _ in range(4)])
            assert not (await b.acquire("k-shared", 5)).allowed
            assert not (await a.acquire("k-shared", 5)).allowed
            # other keys have their own buckets
            assert (await a.acquire("k-other", 5)).allowed
        finally:
            await a.close()
            await b.close()

    asyncio.run(go())


def test_a_lease_serves_the_next_requests_without_redis(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)

    async def go() -> RedisRateLimiter:
        # 100/s, burst 200: a lease of 0.5 s takes 50 tokens at once
        limiter = RedisRateLimiter.from_url(redis_url, lease_s=0.5)
        try:
            assert all([(await limiter.acquire("k-lease", 100)).allowed for _ in range(50)])
            assert limiter.stats.leased == 49
            tokens = float(sync.hget("ratelimit:k-lease", "tokens") or 0)
            assert 150 <= tokens < 151  # taken from the shared bucket before being spent
            assert (await limiter.acquire("k-lease", 100)).allowed  # a new lease
            assert limiter.stats.leased == 49
            return limiter
        finally:
            await limiter.close()

    asyncio.run(go())
    sync.close()


def test_leases_never_let_more_through_than_the_bucket_holds(redis_url: str) -> None:
    async def go() -> None:
        # 10/s, burst 20; each limiter leases 10 tokens (1 s worth) at a time
        a = RedisRateLimiter.from_url(redis_url, lease_s=1.0)
        b = RedisRateLimiter.from_url(redis_url, lease_s=1.0)
        try:
            allowed = 0
            for _ in range(15):
                allowed += (await a.acquire("k-lease-shared", 10)).allowed
                allowed += (await b.acquire("k-lease-shared", 10)).allowed
            # 20 in the bucket, plus what refilled at 10/s during the loop (well under 1 s)
            assert 20 <= allowed <= 25
            assert a.stats.limited + b.stats.limited == 30 - allowed
        finally:
            await a.close()
            await b.close()

    asyncio.run(go())


def test_concurrent_requests_share_one_lease_call(redis_url: str) -> None:
    async def go() -> None:
        # 100/s, burst 200, leases of 50: 40 requests at once need one call, not 40 leases
        # of 50 each (which would drain the bucket after 4 and refuse the other 36)
        limiter = RedisRateLimiter.from_url(redis_url, lease_s=0.5)
        try:
            decisions = await asyncio.gather(
                *(limiter.acquire("k-lease-burst", 100) for _ in range(40))
            )
            assert all(d.allowed for d in decisions)
            assert limiter.stats.leased == 39
        finally:
            await limiter.close()

    asyncio.run(go())


def test_an_expired_lease_goes_back_to_redis(redis_url: str) -> None:
    async def go() -> None:
        limiter = RedisRateLimiter.from_url(redis_url, lease_s=1.0)
        try:
            assert (await limiter.acquire("k-lease-ttl", 100)).allowed  # leases 100
            assert (await limiter.acquire("k-lease-ttl", 100)).allowed
            assert limiter.stats.leased == 1
            await asyncio.sleep(0.3)  # past the 0.25 s lease TTL
            assert (await limiter.acquire("k-lease-ttl", 100)).allowed
            assert limiter.stats.leased == 1
        finally:
            await limiter.close()

    asyncio.run(go())


def test_idle_bucket_expires_and_script_survives_a_flush(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)

    async def go() -> RedisRateLimiter:
        limiter = RedisRateLimiter.from_url(redis_url)
        try:
            await limiter.acquire("k-ttl", 5, cost=4)
            # 4 tokens to refill at 5/s: 0.8 s, plus the 1 s margin
            assert 1000 < sync.pttl("ratelimit:k-ttl") <= 1800
            sync.script_flush()
            assert (await limiter.acquire("k-ttl", 5)).allowed
            assert limiter.stats.script_loads == 1
            assert (await limiter.acquire("k-ttl", 5)).allowed
            assert limiter.stats.script_loads == 1  # the EVAL cached it for the next EVALSHA
            return limiter
        finally:
            await limiter.close()

    asyncio.run(go())
    assert 0 < sync.pttl("ratelimit:k-ttl") <= 2200  # 6 tokens taken: 1.2 s + 1 s
    sync.close()


def test_redis_down_fails_open_and_counts_it(state_dir: Path) -> None:
    port = free_port()
    proc = start_redis(state_dir / "redis-outage", port)

    async def go() -> None:
        # a client with redis-py's default retries: the limiter's own deadline bounds it
        client = aioredis.Redis(
            host="127.0.0.1", port=port, socket_timeout=0.05, socket_connect_timeout=0.05
        )
        limiter = RedisRateLimiter(
            client,
            breaker_failure_threshold=3,
            breaker_reset_timeout_s=0.3,
        )
        try:
            assert all([(await limiter.acquire("k-down", 1)).allowed for _ in range(2)])
            assert not (await limiter.acquire("k-down", 1)).allowed
            proc.stop()
            started = time.monotonic()
            outage = [await limiter.acquire("k-down", 1) for _ in range(50)]
            assert all(d.allowed for d in outage)
            assert time.monotonic() - started < 1.0  # the breaker skips the dead server
            assert limiter.stats.failed_open == 50
            assert limiter.stats.redis_errors == 3

            restarted = start_redis(state_dir / "redis-outage", port)
            try:
                await asyncio.sleep(0.35)  # breaker reset: one trial reaches the new server
                assert all([(await limiter.acquire("k-back", 1)).allowed for _ in range(2)])
                assert not (await limiter.acquire("k-back", 1)).allowed
                assert limiter.stats.failed_open == 50
            finally:
                restarted.stop()
        finally:
            await client.aclose()

    try:
        asyncio.run(go())
    finally:
        proc.stop()


# -- rtinfer apikeys -----------------------------------------------------------------------


def test_cli_create_list_revoke(pg: Pg) -> None:
    runner = CliRunner()
    opt = ["--conninfo", pg.conninfo]
    created = runner.invoke(
        apikeys_app, ["create", "--name", "cli key", "--rate-limit", "7.5", *opt]
    )
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    key_id, _ = parse_token(token)
    assert f"created API key {key_id}" in created.stderr and "cannot be shown again" in (
        created.stderr
    )

    listed = runner.invoke(apikeys_app, ["list", *opt])
    assert listed.exit_code == 0, listed.output
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith(key_id))
    assert "cli key" in line and "7.5/s" in line and line.rstrip().endswith("-")
    assert token not in listed.stdout and parse_token(token)[1] not in listed.stdout

    async def check() -> ApiKey | AuthError:
        async with ApiKeyAuthenticator(pg.conninfo) as auth:
            return await outcome(auth, bearer(token))

    assert asyncio.run(check()) == ApiKey(key_id, "cli key", False, 7.5)

    revoked = runner.invoke(apikeys_app, ["revoke", key_id, *opt])
    assert revoked.exit_code == 0 and f"revoked {key_id}" in revoked.stdout
    again = runner.invoke(apikeys_app, ["revoke", key_id, *opt])
    assert again.exit_code == 0 and "already revoked" in again.stdout
    unknown = runner.invoke(apikeys_app, ["revoke", "zzzzzzzzzzzz", *opt])
    assert unknown.exit_code == 1 and "no API key 'zzzzzzzzzzzz'" in unknown.stderr
    assert isinstance(asyncio.run(check()), InvalidApiKey)
    line = next(
        ln
        for ln in runner.invoke(apikeys_app, ["list", *opt]).stdout.splitlines()
        if ln.startswith(key_id)
    )
    assert not line.rstrip().endswith("-")  # revoked_at is shown


def test_cli_uses_the_running_stacks_database(pg: Pg, state_dir: Path) -> None:
    svc = ServiceState(pid=pg.proc.pid, port=pg.port, log=str(pg.proc.log_path))
    StackState(
        model_repository="unused",
        target="cpu",
        models=[],
        redis=svc,
        triton=svc,
        triton_grpc_port=0,
        triton_metrics_port=0,
        postgres=svc,
    ).save(state_dir)
    runner = CliRunner()
    env = {"RTINFER_STATE_DIR": str(state_dir)}
    created = runner.invoke(apikeys_app, ["create", "--name", "from stack", "--admin"], env=env)
    assert created.exit_code == 0, created.output
    key_id, _ = parse_token(created.stdout.strip())
    with psycopg.connect(pg.conninfo) as conn:
        assert conn.execute(
            "SELECT name, is_admin, rate_limit_per_s FROM api_keys WHERE key_id = %s", (key_id,)
        ).fetchone() == ("from stack", True, None)

    no_stack = runner.invoke(apikeys_app, ["list"], env={"RTINFER_STATE_DIR": str(state_dir / "x")})
    assert no_stack.exit_code == 1 and "rtinfer stack up" in no_stack.stderr
