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
