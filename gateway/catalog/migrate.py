"""Versioned SQL migrations (``gateway/catalog/migrations/NNNN_name.sql``), applied in order.

Applied versions are recorded in ``schema_migrations`` with the sha256 of the file. Each
pending file runs in its own transaction together with its record, under a session advisory
lock so concurrent migrators (several gateways starting at once) apply each file exactly once.
An applied file whose content changed is refused: write a new migration instead.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: pg_advisory_lock key shared by every migrator of a database
ADVISORY_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"rtinfer.schema_migrations").digest()[:8], "big", signed=True
)

_FILE_NAME = re.compile(r"^(?P<number>\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """The migrations directory or the database's migration history is inconsistent."""


@dataclass(frozen=True)
class Migration:
    """One SQL file: version is its name without ``.sql``, e.g. ``0001_model_catalog``."""

    version: str
    path: Path
    body: bytes

    @property
    def number(self) -> str:
        return self.version[:4]

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The ``NNNN_name.sql`` files of ``directory`` in order; other ``.sql`` names are errors."""
    found: dict[str, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNNN_lowercase_name.sql")
        number = match["number"]
        if number in found:
            raise MigrationError(f"{path} and {found[number].path} share number {number}")
        found[number] = Migration(version=path.stem, path=path, body=path.read_bytes())
    return [found[n] for n in sorted(found)]


def apply_migrations(
    conninfo: str,
    directory: Path = MIGRATIONS_DIR,
    lock_timeout_s: float = 60.0,
    connect_timeout_s: int = 10,
) -> list[str]:
    """Apply the pending migrations of ``directory``; return the versions applied, in order.

    Lock waits (for another migrator, and inside the migrations themselves) give up after
    ``lock_timeout_s``. Migration files must not contain BEGIN/COMMIT or statements that
    cannot run inside a transaction block (e.g. CREATE INDEX CONCURRENTLY).
    """
    migrations = load_migrations(directory)
    with psycopg.connect(
        conninfo, autocommit=True, connect_timeout=connect_timeout_s
    ) as conn:  # the session lock goes away with the connection, also on errors
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false)", (f"{int(lock_timeout_s * 1000)}ms",)
        )
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        except psycopg.errors.LockNotAvailable as e:
            raise MigrationError(
                f"another migrator held the migration lock for more than {lock_timeout_s:.0f}s"
            ) from e
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    text PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now(),
                checksum   text NOT NULL
            )
            """
        )
        applied: dict[str, str] = dict(
            conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
        )
        pending = _pending(migrations, applied)
        for version in sorted(set(applied) - {m.version for m in migrations}):
            log.warning("applied migration %s has no file in %s", version, directory)
        done: list[str] = []
        for m in pending:
            started = time.monotonic()
            try:
                with conn.transaction():
                    conn.execute(m.body)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                        (m.version, m.checksum),
                    )
            except psycopg.Error as e:
                raise MigrationError(f"{m.path} failed and was rolled back: {e}") from e
            log.info(
                "applied migration %s in %.0f ms", m.version, 1000 * (time.monotonic() - started)
            )
            done.append(m.version)
    return done


def _pending(migrations: list[Migration], applied: dict[str, str]) -> list[Migration]:
    """Check the applied files are unchanged; return the rest."""
    applied_numbers = {v[:4]: v for v in applied}
    pending = []
    for m in migrations:
        if m.version in applied:
            if applied[m.version] != m.checksum:
                raise MigrationError(
                    f"{m.path} was changed after it was applied (checksum "
                    f"{applied[m.version][:12]}... in schema_migrations, {m.checksum[:12]}... "
                    "on disk); restore it and put the change in a new migration"
                )
        elif m.number in applied_numbers:
            raise MigrationError(
                f"{m.path} reuses number {m.number} of applied migration "
                f"{applied_numbers[m.number]}; was it renamed?"
            )
        else:
            pending.append(m)
    return pending
