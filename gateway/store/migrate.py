"""Versioned DDL migrations of the store (``gateway/store/migrations/NNNN_name.sql``).

The same files run on chdb and on a ClickHouse server. Applied versions are recorded in
``schema_migrations`` with the file's sha256; an applied file whose content changed is refused
(write a new migration instead). ClickHouse has no transactions or advisory locks, so every
statement must be idempotent (``IF NOT EXISTS``, ``ADD COLUMN IF NOT EXISTS``): several sinks
starting at once may run a pending file together, and a half-applied file runs again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.catalog.migrate import Migration, MigrationError, load_migrations
from gateway.store.backend import Store, rows

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_HISTORY_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version    String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version
"""


def statements(migration: Migration) -> list[str]:
    """The statements of one file: split at ``;`` ending a line, comments dropped."""
    lines = [ln for ln in migration.body.decode().splitlines() if not ln.lstrip().startswith("--")]
    text = "\n".join(lines)
    return [s.strip() for s in text.split(";\n") if s.strip().rstrip(";").strip()]


def apply_store_migrations(store: Store, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the pending migrations; return the versions applied, in order."""
    store.command(_HISTORY_DDL)
    applied = {
        r["version"]: r["checksum"]
        for r in rows(
            store,
            "SELECT version, argMax(checksum, applied_at) AS checksum "
            "FROM schema_migrations GROUP BY version",
        )
    }
    done: list[str] = []
    for migration in load_migrations(directory):
        known = applied.get(migration.version)
        if known is not None:
            if known != migration.checksum:
                raise MigrationError(
                    f"store migration {migration.version} changed after it was applied; "
                    "add a new migration instead"
                )
            continue
        for sql in statements(migration):
            store.command(sql.rstrip(";"))
        store.command(
            "INSERT INTO schema_migrations (version, checksum) VALUES ({v:String}, {c:String})",
            {"v": migration.version, "c": migration.checksum},
        )
        log.info("store migration applied: %s", migration.version)
        done.append(migration.version)
    return done
