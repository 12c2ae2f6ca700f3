"""Creating, listing and revoking API keys in the catalog database (``api_keys``), for admins
and tooling; the plaintext token is returned once, at creation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from gateway.auth.credentials import ApiKey, ApiKeyRecord, KeyNotFound, hash_secret, new_token


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
