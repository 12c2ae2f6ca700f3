"""A private PostgreSQL: catalog migrations, change notifications, auth and restarts."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from gateway.catalog.dsn import PostgresDsn, dsn
from gateway.catalog.migrate import (
    MIGRATIONS_DIR,
    MigrationError,
    apply_migrations,
    load_migrations,
)
from rtinfer.postgres_server import SUPERUSER, start_postgres, stop_postgres
from rtinfer.procs import ManagedProcess, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SEEDED = {
    "fraud_blend": "fraud_blend_pipeline",
    "fraud_nn": "fraud_nn_pipeline",
    "fraud_xgb": "fraud_xgb_pipeline",
}


@dataclass
class PgServer:
    data_dir: Path
    port: int
    proc: ManagedProcess

    @property
    def app(self) -> PostgresDsn:
        return dsn(self.data_dir, self.port)

    @property
    def admin(self) -> PostgresDsn:
        return dsn(self.data_dir, self.port, user=SUPERUSER, database="postgres")

    def start(self) -> None:
        self.proc = start_postgres(self.data_dir, self.port)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    # Not tmp_path: pytest's base temp dir is mode 0700, which the unprivileged OS user
    # postgres runs as (when the suite runs as root) cannot traverse. start_postgres hands
    # this directory to that user.
    with tempfile.TemporaryDirectory(prefix="rtinfer-pg-") as tmp:
        data_dir, port = Path(tmp), free_port()
        server = PgServer(data_dir, port, start_postgres(data_dir, port))
        try:
            yield server
        finally:
            stop_postgres(server.proc)


@pytest.fixture()
def db(pg: PgServer) -> str:
    """Conninfo of a new, empty database owned by the app role."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg.admin.conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(pg.app.user)
            )
        )
    return replace(pg.app, database=name).conninfo


@pytest.fixture()
def catalog(db: str) -> str:
    """A database with every migration applied."""
    apply_migrations(db)
    return db


def test_app_role_needs_the_generated_password(pg: PgServer) -> None:
    with psycopg.connect(pg.app.conninfo, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (pg.app.user,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(replace(pg.app, password="wrong").conninfo, connect_timeout=5)


def test_migrations_apply_once_and_seed_the_demo_catalog(db: str) -> None:
    versions = [m.version for m in load_migrations()]
    assert versions[:2] == ["0001_model_catalog", "0002_seed_demo_catalog"]

    assert apply_migrations(db) == versions
    assert apply_migrations(db) == []

    with psycopg.connect(db) as conn:
        recorded = conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        assert [v for (v,) in recorded] == versions
        rows = conn.execute(
            """SELECT model_name, model_version, serving_endpoint, traffic_pct,
                      feature_groups, fallback_config, is_shadow
               FROM model_deployments WHERE is_active ORDER BY model_name"""
        ).fetchall()
    assert {r[0]: r[2] for r in rows} == SEEDED
    for _, version, _, traffic, groups, fallback, shadow in rows:
        assert (version, float(traffic), shadow) == ("1", 100.0, False)
        assert groups == ["user", "merchant", "context"]
        assert fallback == {"type": "class_prior", "score": 0.035, "threshold": 0.5}


def test_changed_applied_migration_is_refused(db: str, tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    applied = apply_migrations(db, directory)

    with (directory / "0001_model_catalog.sql").open("a") as f:
        f.write("\nALTER TABLE api_keys ADD COLUMN note text;\n")
    (directory / "0999_later.sql").write_text("CREATE TABLE later (id int);\n")
    with pytest.raises(MigrationError, match=r"0001_model_catalog\.sql was changed"):
        apply_migrations(db, directory)

    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(applied),)
        assert conn.execute("SELECT to_regclass('later')").fetchone() == (None,)


def test_concurrent_migrators_apply_each_version_once(db: str, tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    # holds the lock long enough that the second migrator surely waits for it
    (directory / "0999_slow.sql").write_text("SELECT pg_sleep(1);\n")
    versions = [m.version for m in load_migrations(directory)]

    start = threading.Barrier(2)

    def migrate() -> list[str]:
        start.wait(timeout=5)
        return apply_migrations(db, directory, lock_timeout_s=20)

    with ThreadPoolExecutor(2) as pool, psycopg.connect(db, autocommit=True) as probe:
        futures = [pool.submit(migrate) for _ in range(2)]
        deadline = time.monotonic() + 5
        waiting = 0
        while not waiting and time.monotonic() < deadline:
            row = probe.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()
            waiting = row[0] if row else 0
            time.sleep(0.02)
        results = [f.result(timeout=30) for f in futures]

    assert waiting == 1, "the second migrator never waited for the lock"
    assert sorted(results, key=len) == [[], versions]
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(versions),)


def test_catalog_change_is_notified_on_commit(catalog: str) -> None:
    with (
        psycopg.connect(catalog, autocommit=True) as listener,
        psycopg.connect(catalog, autocommit=True) as writer,
    ):
        listener.execute("LISTEN model_catalog")
        with writer.transaction() as tx:
            cur = writer.execute(
                "UPDATE model_deployments SET traffic_pct = 10 WHERE model_name = 'fraud_nn'"
            )
            assert cur.rowcount == 1
            raise psycopg.Rollback(tx)
        # nothing for a rolled-back change
        assert list(listener.notifies(timeout=0.3)) == []

        writer.execute(
            "UPDATE model_deployments SET traffic_pct = 50 WHERE model_name = 'fraud_xgb'"
        )
        committed = time.monotonic()
        received = list(listener.notifies(timeout=1.0, stop_after=1))
        elapsed = time.monotonic() - committed

    assert len(received) == 1 and elapsed < 1.0
    assert received[0].channel == "model_catalog"
    payload = json.loads(received[0].payload)
    assert payload["model_name"] == "fraud_xgb"
    assert payload["op"] == "UPDATE"
    assert isinstance(payload["deployment_id"], int)


def test_one_active_row_per_model_version_and_role(catalog: str) -> None:
    insert = """INSERT INTO model_deployments
                    (model_name, model_version, serving_endpoint, traffic_pct, is_shadow)
                VALUES ('fraud_nn', '1', 'fraud_nn_pipeline', 100, %s)"""
    with psycopg.connect(catalog, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation, match="model_deployments_active_key"):
            conn.execute(insert, (False,))
        conn.execute(insert, (True,))  # a shadow of the same version is another role

        conn.execute(
            "UPDATE model_deployments SET is_active = false "
            "WHERE model_name = 'fraud_nn' AND NOT is_shadow"
        )
        conn.execute(insert, (False,))  # retired rows do not count
        counts = conn.execute(
            "SELECT is_active, count(*) FROM model_deployments "
            "WHERE model_name = 'fraud_nn' AND NOT is_shadow GROUP BY is_active"
        ).fetchall()
    assert dict(counts) == {True: 1, False: 1}


@pytest.mark.parametrize(
    ("shutdown", "client_connected"),
    [
        ("fast", True),  # stop_postgres: open transactions are rolled back, clients cut off
        ("smart", False),  # ManagedProcess.stop (SIGTERM): clean only once clients are gone
    ],
)
def test_restart_keeps_data(
    pg: PgServer, catalog: str, shutdown: str, client_connected: bool
) -> None:
    key_id = f"k_{shutdown}"
    with psycopg.connect(catalog) as conn:
        conn.execute(
            "INSERT INTO api_keys (key_id, key_hash, name) VALUES (%s, %s, 'restart test')",
            (key_id, "sha256:" + "0" * 64),
        )
    log_start = pg.proc.log_path.stat().st_size

    client = psycopg.connect(catalog) if client_connected else None
    if client is not None:
        client.execute(
            "INSERT INTO api_keys (key_id, key_hash, name) VALUES ('k_uncommitted', 'x', 'x')"
        )
    stopped = time.monotonic()
    if shutdown == "fast":
        stop_postgres(pg.proc)
    else:
        pg.proc.stop(timeout_s=10)  # SIGTERM to the process group
    assert not pg.proc.alive() and time.monotonic() - stopped < 5
    if client is not None:
        client.close()
    pg.start()

    with psycopg.connect(catalog) as conn:
        assert conn.execute(
            "SELECT name FROM api_keys WHERE key_id = %s", (key_id,)
        ).fetchone() == ("restart test",)
        assert conn.execute("SELECT count(*) FROM model_deployments").fetchone() == (len(SEEDED),)
        assert conn.execute(
            "SELECT count(*) FROM api_keys WHERE key_id = 'k_uncommitted'"
        ).fetchone() == (0,)
    with pg.proc.log_path.open("rb") as f:
        f.seek(log_start)
        restart_log = f.read().decode(errors="replace")
    assert "database system is shut down" in restart_log
    assert "database system was shut down at" in restart_log
    assert "not properly shut down" not in restart_log
