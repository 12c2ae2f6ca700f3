"""Where the catalog database is: connection settings of the local stack's PostgreSQL.

The local instance (``<state>/postgres``, started by ``rtinfer stack up``) keeps its generated
password in ``<state>/postgres/password``; everything that connects to it reads it from there.
A deployment elsewhere configures ``gateway.postgres_dsn`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from gateway.settings import Settings


class CatalogNotStarted(RuntimeError):
    """The local catalog database has never been started (no password file yet)."""


@dataclass(frozen=True)
class PostgresDsn:
    """Where and as whom to connect."""

    host: str
    port: int
    user: str
    database: str
    password: str = field(repr=False)

    @property
    def conninfo(self) -> str:
        """libpq ``key=value`` string, e.g. for ``psycopg.connect``."""
        return make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=self.database,
            password=self.password,
        )

    @property
    def url(self) -> str:
        """``postgresql://`` URL (password percent-encoded)."""
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}"
        )


def password_file(data_dir: Path) -> Path:
    """The generated password of the instance in ``data_dir``."""
    return data_dir / "password"


def dsn(
    data_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    user: str = "rtinfer",
    database: str = "rtinfer",
) -> PostgresDsn:
    """Connection settings of the instance in ``data_dir`` (reads its password file)."""
    pw_file = password_file(data_dir)
    if not pw_file.exists():
        raise CatalogNotStarted(f"no password file {pw_file}; start the instance first")
    return PostgresDsn(host, port, user, database, pw_file.read_text().strip())


def catalog_conninfo(settings: Settings) -> str:
    """``gateway.postgres_dsn``, else the local stack's instance (its generated password)."""
    if settings.gateway.postgres_dsn is not None:
        return settings.gateway.postgres_dsn.get_secret_value()
    pg = settings.postgres
    return dsn(settings.state_dir / "postgres", pg.port, pg.host, pg.user, pg.database).conninfo


def catalog_pool(settings: Settings, name: str, max_size: int) -> AsyncConnectionPool:
    """An unopened autocommit pool on the catalog database."""
    timeout_s = settings.gateway.postgres_connect_timeout_s
    return AsyncConnectionPool(
        catalog_conninfo(settings),
        min_size=1,
        max_size=max_size,
        open=False,
        timeout=timeout_s,
        kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout_s))},
        name=name,
        check=AsyncConnectionPool.check_connection,  # drop connections a restart broke
    )
