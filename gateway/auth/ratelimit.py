"""Per-API-key rate limiting: a token bucket per key in Redis, shared by every gateway.

Bucket ``ratelimit:{key_id}`` is a hash ``{tokens, ts}``. It refills at the key's
``rate_limit_per_s`` up to ``burst = max(1, rate * burst_multiplier)`` tokens (2x the rate by
default: a client may send two seconds' worth at once, then the steady rate). One Lua script
reads, refills, takes and writes the bucket atomically, with Redis' own ``TIME`` as the clock,
so gateways with skewed clocks still agree. The script is called by ``EVALSHA``; after a
``NOSCRIPT`` (Redis restarted or flushed its script cache) it is sent once with ``EVAL``.
Buckets get a TTL of the time a refill from empty takes (+1 s), so idle keys leave Redis: an
expired bucket and a full one are the same thing.

**Leases.** A call takes up to ``lease_s`` seconds' worth of the key's rate (at least the
request's cost, at most what the bucket holds) and this process serves the next requests of
that key from the leased tokens, without a Redis round trip, until they are used up or
``lease_ttl_s`` has passed. Tokens are taken from the shared bucket before they are spent, so
the limit is never exceeded; what a lease does not use before it expires is lost, at most
``rate * lease_s`` tokens per process and lease. Keys slower than ``1 / lease_s`` requests/s
lease one token at a time, exactly as without leases. ``lease_s = 0`` turns leases off.

**Redis down fails open.** A rate limiter protects capacity; it is not an access control
(authentication is). Refusing every request because the limiter's store is unreachable would
turn a Redis outage into a full outage of the prediction API, so a failed call allows the
request and is counted (``stats.failed_open``, ``stats.redis_errors``) and logged. Calls have
an explicit deadline (``timeout_s``), and after ``breaker_failure_threshold`` consecutive
failures a circuit breaker skips Redis for ``breaker_reset_timeout_s``, so a dead Redis costs
microseconds per request instead of a timeout each.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from gateway import errors
from python_backend.breaker import CircuitBreaker

log = logging.getLogger(__name__)

#: KEYS[1] bucket; ARGV rate (tokens/s), burst (capacity), cost, want (>= cost: the lease).
#: Returns {allowed 0|1, tokens left, seconds until ``cost`` tokens are available, tokens
#: granted (cost <= granted <= want)}; floats as strings (Lua numbers would be truncated to
#: integers in the reply).
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
if tokens < cost then
  -- nothing written: recomputing from the stored state later gives the same answer
  return {0, tostring(tokens), tostring((cost - tokens) / rate), '0'}
end
local take = math.min(tokens, want)
tokens = tokens - take
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
-- until the bucket is full again, plus a second; %d: PEXPIRE wants an integer literal
local ttl_ms = math.ceil((burst - tokens) / rate * 1000) + 1000
redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl_ms))
return {1, tostring(tokens), '0', tostring(take)}
"""
_SCRIPT_SHA = hashlib.sha1(TOKEN_BUCKET_LUA.encode()).hexdigest()


@dataclass(frozen=True)
class RateDecision:
    """Outcome of one :meth:`RedisRateLimiter.acquire`."""

    allowed: bool
    #: seconds until the request would be allowed (0 when allowed)
    retry_after_s: float
    #: tokens left in the bucket (``inf`` when the key has no limit or the limiter failed open)
    remaining: float


class RateLimited(errors.RateLimited):
    """429 for a key over its limit (the gateway's ``RateLimited``, made from a decision).

    ``retry_after`` is what ``Retry-After`` says: whole seconds, rounded up, at least 1.
    """

    def __init__(self, rate_per_s: float, retry_after_s: float) -> None:
        self.retry_after = retry_after_seconds(retry_after_s)
        super().__init__(
            f"rate limit of {rate_per_s:g} requests/s exceeded; retry in {self.retry_after} s",
            float(self.retry_after),
        )


def retry_after_seconds(seconds: float) -> int:
    """``Retry-After`` value: whole seconds rounded up, at least 1 (0 would invite a spin).

    Float noise below a microsecond is ignored, so exactly 1.0 s stays 1, not 2.
    """
    return max(1, math.ceil(seconds - 1e-6))


def burst_for(rate_per_s: float, multiplier: float) -> float:
    """Bucket capacity: ``multiplier`` seconds' worth of requests, at least one request."""
    return max(1.0, rate_per_s * multiplier)


@dataclass
class _Lease:
    """Tokens this process took from a key's bucket ahead of its requests."""

    tokens: float
    expires_at: float
    rate_per_s: float


@dataclass
class RateLimiterStats:
    """Counters for the gateway's metrics."""

    allowed: int = 0
    limited: int = 0
    #: requests allowed because Redis failed or the breaker was open
    failed_open: int = 0
    #: Redis calls that failed (errors and timeouts)
    redis_errors: int = 0
    #: EVALSHA answered NOSCRIPT and the script was sent again
    script_loads: int = 0
    #: requests allowed from a lease, without a Redis call
    leased: int = 0


class RedisRateLimiter:
    """Token-bucket limiter over a shared ``redis.asyncio.Redis``.

    The client should fail fast (see :meth:`from_url`); every call is also bounded by
    ``timeout_s`` here. The breaker state is per limiter, i.e. per gateway process.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        burst_multiplier: float = 2.0,
        timeout_s: float = 0.05,
        key_prefix: str = "ratelimit",
        breaker_failure_threshold: int = 3,
        breaker_reset_timeout_s: float = 1.0,
        lease_s: float = 0.0,
        lease_ttl_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst_multiplier <= 0 or timeout_s <= 0:
            raise ValueError("burst_multiplier and timeout_s must be positive")
        if lease_s < 0 or lease_ttl_s <= 0:
            raise ValueError("lease_s must be >= 0 and lease_ttl_s positive")
        self._client = client
        self._owns_client = False
        self._burst_multiplier = burst_multiplier
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._breaker = CircuitBreaker(breaker_failure_threshold, breaker_reset_timeout_s, clock)
        self._lease_s, self._lease_ttl_s, self._clock = lease_s, lease_ttl_s, clock
        self._leases: dict[str, _Lease] = {}
        #: per key, the lease call in flight that other requests of the key wait for
        self._fetching: dict[str, asyncio.Future[None]] = {}
        self.stats = RateLimiterStats()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        burst_multiplier: float = 2.0,
        timeout_s: float = 0.05,
        breaker_failure_threshold: int = 3,
        breaker_reset_timeout_s: float = 1.0,
        lease_s: float = 0.0,
    ) -> RedisRateLimiter:
        """A limiter owning a fail-fast client: one attempt, ``timeout_s`` to connect and answer."""
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        limiter = cls(
            client,
            burst_multiplier=burst_multiplier,
            timeout_s=timeout_s,
            breaker_failure_threshold=breaker_failure_threshold,
            breaker_reset_timeout_s=breaker_reset_timeout_s,
            lease_s=lease_s,
        )
        limiter._owns_client = True
        return limiter

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def bucket_key(self, key_id: str) -> str:
        return f"{self._prefix}:{key_id}"

    async def acquire(self, key_id: str, rate_per_s: float | None, cost: float = 1) -> RateDecision:
        """Take ``cost`` tokens from ``key_id``'s bucket if it has them.

        ``rate_per_s=None`` (no per-key limit) allows without calling Redis. ``cost`` must be
        positive and fit in the bucket, or it could never be allowed.
        """
        if rate_per_s is None:
            return RateDecision(True, 0.0, math.inf)
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        burst = burst_for(rate_per_s, self._burst_multiplier)
        if not 0 < cost <= burst:
            raise ValueError(f"cost must be in (0, {burst:g}] for rate {rate_per_s:g}/s")
        leased = await self._leased(key_id, rate_per_s, cost)
        if leased is not None:
            return leased
        if not self._breaker.allow():
            self.stats.failed_open += 1
            return RateDecision(True, 0.0, math.inf)
        want = max(cost, min(burst, rate_per_s * self._lease_s))
        fetched = self._begin_fetch(key_id) if want > cost else None
        try:
            reply = await self._call(key_id, rate_per_s, burst, cost, want)
            if reply is None:
                return RateDecision(True, 0.0, math.inf)
            allowed, remaining, retry_after = int(reply[0]) == 1, float(reply[1]), float(reply[2])
            if allowed:
                self.stats.allowed += 1
                self._keep_lease(key_id, rate_per_s, float(reply[3]) - cost)
            else:
                self.stats.limited += 1
            return RateDecision(allowed, retry_after, remaining)
        finally:
            if fetched is not None:
                self._settle_fetch(key_id, fetched)

    async def _call(
        self, key_id: str, rate_per_s: float, burst: float, cost: float, want: float
    ) -> list[bytes] | None:
        """The script's reply, or ``None`` when Redis failed (the request is let through)."""
        try:
            reply = await asyncio.wait_for(
                self._run(self.bucket_key(key_id), rate_per_s, burst, cost, want),
                self._timeout_s,
            )
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._breaker.record_failure()
            self.stats.redis_errors += 1
            self.stats.failed_open += 1
            log.warning(
                "rate limiter failing open: redis %s: %s",
                type(exc).__name__,
                str(exc) or "timeout",
            )
            return None
        self._breaker.record_success()
        return reply

    async def _leased(self, key_id: str, rate_per_s: float, cost: float) -> RateDecision | None:
        """Allowed from the lease, waiting for a lease call of the key already in flight."""
        while (leased := self._from_lease(key_id, rate_per_s, cost)) is None:
            fetching = self._fetching.get(key_id)
            if fetching is None:
                return None
            await asyncio.shield(fetching)  # one lease call per key at a time; then retry
        return leased

    def _begin_fetch(self, key_id: str) -> asyncio.Future[None]:
        fetched: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fetching[key_id] = fetched
        return fetched

    def _from_lease(self, key_id: str, rate_per_s: float, cost: float) -> RateDecision | None:
        """Allowed from this process's lease of the key, or ``None`` (ask Redis)."""
        lease = self._leases.get(key_id)
        if lease is None:
            return None
        if lease.expires_at <= self._clock() or lease.rate_per_s != rate_per_s:
            del self._leases[key_id]
            return None
        if lease.tokens < cost:
            return None
        lease.tokens -= cost
        self.stats.allowed += 1
        self.stats.leased += 1
        return RateDecision(True, 0.0, lease.tokens)

    def _keep_lease(self, key_id: str, rate_per_s: float, tokens: float) -> None:
        """Keep ``tokens`` taken beyond the request's cost (with what is left of the old lease)."""
        if tokens < 1e-9:
            return
        now = self._clock()
        old = self._leases.get(key_id)
        if old is not None and old.expires_at > now and old.rate_per_s == rate_per_s:
            tokens += old.tokens
        self._leases[key_id] = _Lease(tokens, now + self._lease_ttl_s, rate_per_s)

    def _settle_fetch(self, key_id: str, fetched: asyncio.Future[None]) -> None:
        """Wake the requests that waited for this lease call."""
        if self._fetching.get(key_id) is fetched:
            del self._fetching[key_id]
        if not fetched.done():
            fetched.set_result(None)

    async def enforce(self, key_id: str, rate_per_s: float | None, cost: float = 1) -> RateDecision:
        """:meth:`acquire`, raising :class:`RateLimited` when refused."""
        decision = await self.acquire(key_id, rate_per_s, cost)
        if not decision.allowed and rate_per_s is not None:  # unlimited keys are never refused
            raise RateLimited(rate_per_s, decision.retry_after_s)
        return decision

    async def _run(
        self, key: str, rate: float, burst: float, cost: float, want: float
    ) -> list[bytes]:
        args = (repr(float(rate)), repr(float(burst)), repr(float(cost)), repr(float(want)))
        try:
            return await cast(
                Awaitable[list[bytes]], self._client.evalsha(_SCRIPT_SHA, 1, key, *args)
            )
        except NoScriptError:
            self.stats.script_loads += 1
            return await cast(
                Awaitable[list[bytes]], self._client.eval(TOKEN_BUCKET_LUA, 1, key, *args)
            )
