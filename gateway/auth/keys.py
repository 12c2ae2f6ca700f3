"""API-key authentication of gateway requests.

Keys look like ``rti_<key_id>_<secret>``: ``key_id`` is 12 random base32 characters (the
primary key of ``api_keys``, safe to log), ``secret`` 32 random bytes in urlsafe base64. The
table stores only a salted scrypt hash of the secret, ``scrypt$n$r$p$salt$hash``; the plaintext
is shown once, when the key is created.

scrypt is slow by design (55 ms on a 2-core x86 box), so :class:`ApiKeyAuthenticator`
remembers verified keys in-process, keyed by the sha256 of the whole token, for
``cache_ttl_s`` (60 s): a request with a cached key costs a few microseconds. Consequences:

- **Revocation, and changes of ``is_admin`` or ``rate_limit_per_s``, take effect within
  ``cache_ttl_s``** on every gateway: until its entry expires, a gateway keeps accepting a key
  it verified before the change.
- If Postgres is unreachable, keys verified within the TTL keep working; any other key gets
  503 ``auth_unavailable`` (never 500, never 401: the key may well be valid).
- Rejected tokens are remembered for ``negative_ttl_s`` (5 s), so a client retrying a bad key
  in a loop costs neither a query nor a hash.
- Concurrent requests with the same uncached token share one lookup and one hash.
- An unknown key id is refused without hashing, so it answers faster than a wrong secret.
  Key ids are not secret (they are logged); hashing a dummy instead would only hand
  attackers free CPU.

Hashes run in a small dedicated thread pool (``hash_workers``), never on the event loop, so a
flood of wrong secrets for a real key id cannot starve other blocking work.

Failures raise :class:`AuthError` subclasses (typed gateway errors): 401 ``missing_api_key``,
``malformed_api_key`` or ``invalid_api_key`` (unknown, revoked and wrong secret all read
"invalid API key"), and 503 ``auth_unavailable``."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

import psycopg
from cachetools import TTLCache
from psycopg_pool import AsyncConnectionPool

from gateway.auth.credentials import (
    ApiKey,
    AuthUnavailable,
    InvalidApiKey,
    extract_token,
    parse_token,
    verify_secret,
)

log = logging.getLogger(__name__)


_LOOKUP_SQL = """SELECT key_hash, name, is_admin, rate_limit_per_s, revoked_at IS NOT NULL
                 FROM api_keys WHERE key_id = %s"""


class VerificationCache:
    """Recent verification results keyed by sha256(token): LRU-bounded, per-entry TTL."""

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl_s: float = 60.0,
        negative_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl_s <= 0 or negative_ttl_s <= 0:
            raise ValueError("max_entries, ttl_s and negative_ttl_s must be positive")
        self._valid: TTLCache[bytes, ApiKey] = TTLCache(max_entries, ttl_s, timer=clock)
        self._invalid: TTLCache[bytes, bool] = TTLCache(max_entries, negative_ttl_s, timer=clock)

    def get_valid(self, digest: bytes) -> ApiKey | None:
        return self._valid.get(digest)

    def is_known_invalid(self, digest: bytes) -> bool:
        return digest in self._invalid

    def put_valid(self, digest: bytes, key: ApiKey) -> None:
        self._valid[digest] = key
        self._invalid.pop(digest, None)

    def put_invalid(self, digest: bytes) -> None:
        self._invalid[digest] = True
        self._valid.pop(digest, None)


@dataclass
class AuthStats:
    """Counters for the gateway's metrics."""

    cache_hits: int = 0
    negative_cache_hits: int = 0
    db_lookups: int = 0
    db_errors: int = 0
    hash_verifications: int = 0


@dataclass(frozen=True)
class _Row:
    key_hash: str
    name: str
    is_admin: bool
    rate_limit_per_s: float | None
    revoked: bool


class ApiKeyAuthenticator:
    """Authenticates request headers against ``api_keys`` (see the module doc for caching).

    Give it a conninfo (it then owns a small pool, opened without waiting so the gateway
    starts while Postgres is down) or a shared ``AsyncConnectionPool`` (opened and closed by
    its owner). Use ``async with`` or :meth:`open` / :meth:`close`.
    """

    def __init__(
        self,
        db: AsyncConnectionPool | str,
        *,
        cache_ttl_s: float = 60.0,
        negative_ttl_s: float = 5.0,
        cache_max_entries: int = 10_000,
        lookup_timeout_s: float = 1.0,
        hash_workers: int = 2,
    ) -> None:
        if lookup_timeout_s <= 0:
            raise ValueError("lookup_timeout_s must be positive")
        self._lookup_timeout_s = lookup_timeout_s
        self._owns_pool = isinstance(db, str)
        if isinstance(db, str):
            self._pool: AsyncConnectionPool = AsyncConnectionPool(
                db,
                min_size=1,
                max_size=4,
                open=False,
                timeout=lookup_timeout_s,
                check=AsyncConnectionPool.check_connection,
                name="api-keys",
                kwargs={
                    "autocommit": True,
                    "connect_timeout": max(2, round(lookup_timeout_s)),
                    "options": f"-c statement_timeout={int(lookup_timeout_s * 1000)}",
                },
            )
        else:
            self._pool = db
        self._cache = VerificationCache(cache_max_entries, cache_ttl_s, negative_ttl_s)
        self._hashers = ThreadPoolExecutor(hash_workers, thread_name_prefix="apikey-hash")
        self._inflight: dict[bytes, asyncio.Task[ApiKey]] = {}
        self.stats = AuthStats()

    async def open(self) -> None:
        if self._owns_pool:
            await self._pool.open(wait=False)

    async def close(self) -> None:
        pending = list(self._inflight.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._owns_pool:
            await self._pool.close()
        self._hashers.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> ApiKeyAuthenticator:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def authenticate(self, headers: Mapping[str, str]) -> ApiKey:
        """The key presented in ``headers``; raises an :class:`AuthError` subclass."""
        token = extract_token(headers)
        key_id, secret = parse_token(token)
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get_valid(digest)
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
        if self._cache.is_known_invalid(digest):
            self.stats.negative_cache_hits += 1
            raise InvalidApiKey()
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._verify(key_id, secret, digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda t: self._verified(digest, t))
        # shielded: a cancelled request must not cancel the lookup other requests wait for
        try:
            return await asyncio.shield(task)
        # each request gets its own error object (the error handler marks them as logged)
        except InvalidApiKey:
            raise InvalidApiKey() from None
        except AuthUnavailable as exc:
            raise AuthUnavailable() from exc.__cause__

    def _verified(self, digest: bytes, task: asyncio.Task[ApiKey]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved here, whether or not a waiter is left

    async def _verify(self, key_id: str, secret: str, digest: bytes) -> ApiKey:
        row = await self._lookup(key_id)
        if row is None or row.revoked:
            self._cache.put_invalid(digest)
            raise InvalidApiKey()
        loop = asyncio.get_running_loop()
        self.stats.hash_verifications += 1
        try:
            ok = await loop.run_in_executor(self._hashers, verify_secret, secret, row.key_hash)
        except ValueError as exc:
            log.error("api key %s has an unusable key_hash: %s", key_id, exc)
            ok = False
        if not ok:
            self._cache.put_invalid(digest)
            raise InvalidApiKey()
        key = ApiKey(key_id, row.name, row.is_admin, row.rate_limit_per_s)
        self._cache.put_valid(digest, key)
        return key

    async def _lookup(self, key_id: str) -> _Row | None:
        self.stats.db_lookups += 1
        try:
            return await asyncio.wait_for(self._query(key_id), self._lookup_timeout_s)
        except (psycopg.Error, OSError, asyncio.TimeoutError) as exc:
            self.stats.db_errors += 1
            log.warning(
                "api key lookup failed (%s: %s)", type(exc).__name__, str(exc).strip() or "timeout"
            )
            raise AuthUnavailable() from exc

    async def _query(self, key_id: str) -> _Row | None:
        async with self._pool.connection(timeout=self._lookup_timeout_s) as conn:
            if conn.autocommit:
                cur = await conn.execute(_LOOKUP_SQL, (key_id,))
                row = await cur.fetchone()
            else:
                async with conn.transaction():
                    cur = await conn.execute(_LOOKUP_SQL, (key_id,))
                    row = await cur.fetchone()
        if row is None:
            return None
        key_hash, name, is_admin, rate, revoked = row
        return _Row(key_hash, name, is_admin, float(rate) if rate is not None else None, revoked)
