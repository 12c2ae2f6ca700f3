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
"invalid API key"), and 503 ``auth_unavailable``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

import psycopg
from cachetools import TTLCache
from psycopg_pool import AsyncConnectionPool

from gateway.errors import Unauthorized

log = logging.getLogger(__name__)

TOKEN_PREFIX = "rti"
KEY_ID_LENGTH = 12
SECRET_BYTES = 32
_TOKEN = re.compile(r"rti_(?P<key_id>[a-z2-7]{12})_(?P<secret>[A-Za-z0-9_-]{43})")

#: scrypt cost: N=2**14, r=8 (16 MiB), p=1 -- the classic interactive-login setting, 55 ms
#: on a 2-core box. Verification reads the parameters from the stored hash, so raising them
#: later only affects new keys.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
#: refuse stored parameters that would need more memory than this (128 * n * r * p bytes)
_SCRYPT_MAX_MEM = 64 * 1024 * 1024

_LOOKUP_SQL = """SELECT key_hash, name, is_admin, rate_limit_per_s, revoked_at IS NOT NULL
                 FROM api_keys WHERE key_id = %s"""


@dataclass(frozen=True)
class ApiKey:
    """An authenticated caller."""

    key_id: str
    name: str
    is_admin: bool
    #: requests per second; ``None`` = no per-key limit
    rate_limit_per_s: float | None


@dataclass(frozen=True)
class ApiKeyRecord(ApiKey):
    """A row of ``api_keys`` as listed by operators."""

    created_at: datetime
    revoked_at: datetime | None


class AuthError(Unauthorized):
    """The request is not authenticated: 401 (``status``, ``code``, ``message``, ``headers``
    of :class:`gateway.errors.GatewayError`, rendered by the gateway's one error handler)."""

    @property
    def headers(self) -> dict[str, str]:
        """The RFC 6750 challenge every 401 carries."""
        return {"WWW-Authenticate": 'Bearer realm="rtinfer"'}


class MissingCredentials(AuthError):
    code = "missing_api_key"

    def __init__(self) -> None:
        super().__init__(
            "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )


class MalformedToken(AuthError):
    code = "malformed_api_key"

    def __init__(self, message: str = "malformed API key: expected rti_<key id>_<secret>") -> None:
        super().__init__(message)


class InvalidApiKey(AuthError):
    """Unknown key id, revoked key or wrong secret: deliberately indistinguishable."""

    code = "invalid_api_key"

    def __init__(self) -> None:
        super().__init__("invalid API key")


class AuthUnavailable(AuthError):
    """The key store cannot be reached and the key is not in the cache: 503, not 401, since
    the key may well be valid."""

    status = 503
    code = "auth_unavailable"

    def __init__(self) -> None:
        super().__init__("cannot verify the API key right now (key store unavailable); retry")

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class KeyNotFound(LookupError):
    """No ``api_keys`` row with this key id."""


# -- tokens and hashes ---------------------------------------------------------------------


def new_token() -> tuple[str, str, str]:
    """A fresh ``(key_id, secret, token)``."""
    key_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()[:KEY_ID_LENGTH]
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).decode().rstrip("=")
    return key_id, secret, format_token(key_id, secret)


def format_token(key_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}_{key_id}_{secret}"


def parse_token(token: str) -> tuple[str, str]:
    """``(key_id, secret)`` of a well-formed token; :class:`MalformedToken` otherwise."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise MalformedToken()
    return match["key_id"], match["secret"]


def hash_secret(secret: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` of ``secret`` with a fresh random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(secret, salt, n, r, p, _HASH_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, encoded: str) -> bool:
    """Whether ``secret`` matches ``encoded`` (constant-time compare); ``ValueError`` if
    ``encoded`` is not a hash this module wrote."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not an scrypt$n$r$p$salt$hash string")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, expected = _unb64(parts[4]), _unb64(parts[5])
    except ValueError as exc:
        raise ValueError(f"corrupt scrypt hash: {exc}") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * n * r * p > _SCRYPT_MAX_MEM:
        raise ValueError(f"unsupported scrypt parameters n={n} r={r} p={p}")
    if not salt or not expected:
        raise ValueError("corrupt scrypt hash: empty salt or hash")
    return hmac.compare_digest(_scrypt(secret, salt, n, r, p, len(expected)), expected)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=_SCRYPT_MAX_MEM + 2**20
    )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def extract_token(headers: Mapping[str, str]) -> str:
    """The token of ``Authorization: Bearer <token>`` or else ``X-API-Key: <token>``."""
    authorization = (_header(headers, "authorization") or "").strip()
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        if not value.strip():
            raise MalformedToken("malformed Authorization header: empty bearer token")
        return value.strip()
    api_key = (_header(headers, "x-api-key") or "").strip()
    if api_key:
        return api_key
    if authorization:
        raise MalformedToken(
            f"unsupported Authorization scheme {scheme[:20]!r}: use 'Bearer <key>' or X-API-Key"
        )
    raise MissingCredentials()


def _header(headers: Mapping[str, str], lower_name: str) -> str | None:
    """Case-insensitive header lookup (Starlette's ``Headers`` already is; a dict may not be)."""
    value = headers.get(lower_name)
    if value is not None:
        return value
    for name, value in headers.items():
        if name.lower() == lower_name:
            return value
    return None


# -- administration (sync: the CLI and tests) ----------------------------------------------


def create_api_key(
    db: psycopg.Connection | str,
    name: str,
    is_admin: bool = False,
    rate_limit_per_s: float | None = None,
) -> tuple[ApiKey, str]:
    """Insert a new key; return it with its token (the only time the secret exists)."""
    if not name.strip():
        raise ValueError("name must not be empty")
    if rate_limit_per_s is not None and not rate_limit_per_s > 0:
        raise ValueError("rate_limit_per_s must be positive (or None for no limit)")
    key_id, secret, token = new_token()
    with _connection(db) as conn:
        conn.execute(
            """INSERT INTO api_keys (key_id, key_hash, name, is_admin, rate_limit_per_s)
               VALUES (%s, %s, %s, %s, %s)""",
            (key_id, hash_secret(secret), name, is_admin, rate_limit_per_s),
        )
    return ApiKey(key_id, name, is_admin, rate_limit_per_s), token


def revoke_api_key(db: psycopg.Connection | str, key_id: str) -> bool:
    """Revoke ``key_id``: ``True`` if revoked now, ``False`` if it already was.

    Gateways stop accepting the key once their cached verification expires (``cache_ttl_s``).
    """
    with _connection(db) as conn:
        revoked = conn.execute(
            "UPDATE api_keys SET revoked_at = now() "
            "WHERE key_id = %s AND revoked_at IS NULL RETURNING key_id",
            (key_id,),
        ).fetchone()
        if revoked is not None:
            return True
        exists = conn.execute("SELECT 1 FROM api_keys WHERE key_id = %s", (key_id,)).fetchone()
    if exists is None:
        raise KeyNotFound(f"no API key {key_id!r}")
    return False


def list_api_keys(db: psycopg.Connection | str) -> list[ApiKeyRecord]:
    """Every key, oldest first, revoked ones included."""
    with _connection(db) as conn:
        rows = conn.execute(
            """SELECT key_id, name, is_admin, rate_limit_per_s, created_at, revoked_at
               FROM api_keys ORDER BY created_at, key_id"""
        ).fetchall()
    return [
        ApiKeyRecord(k, n, a, float(r) if r is not None else None, c, v)
        for k, n, a, r, c, v in rows
    ]


@contextmanager
def _connection(db: psycopg.Connection | str) -> Iterator[psycopg.Connection]:
    """A connection given by the caller (left open, committed) or opened from a conninfo."""
    if isinstance(db, str):
        with psycopg.connect(db, autocommit=True, connect_timeout=10) as conn:
            yield conn
        return
    yield db
    if not db.autocommit:
        db.commit()


# -- the request path ----------------------------------------------------------------------


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
