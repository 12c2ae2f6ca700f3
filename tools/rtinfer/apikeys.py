"""``rtinfer apikeys``: create, list and revoke the gateway's API keys in the catalog database.

By default the commands talk to the PostgreSQL of the running stack (``rtinfer stack up``);
``--conninfo`` points them at any other database migrated from ``gateway/catalog/migrations``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import psycopg
import typer

from gateway.auth.credentials import KeyNotFound
from gateway.auth.key_store import create_api_key, list_api_keys, revoke_api_key
from gateway.catalog.dsn import CatalogNotStarted, dsn
from gateway.settings import Settings
from rtinfer.stack import StackState, service_alive

apikeys_app = typer.Typer(
    help="Create, list and revoke the gateway's API keys.",
    no_args_is_help=True,
    add_completion=False,
)

ConninfoOpt = Annotated[
    str | None,
    typer.Option(
        "--conninfo",
        help="libpq conninfo or postgresql:// URL (default: the running stack's catalog).",
    ),
]

T = TypeVar("T")


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _stack_conninfo() -> str:
    settings = Settings()
    state = StackState.load(settings.state_dir)
    if state is None or state.postgres is None:
        _fail(
            f"no PostgreSQL in the stack state of {settings.state_dir}; start it with "
            "`rtinfer stack up` or pass --conninfo"
        )
    if not service_alive(settings.state_dir, "postgres", state.postgres):
        _fail("the stack's PostgreSQL is not running")
    pg = settings.postgres
    try:
        return dsn(
            settings.state_dir / "postgres", state.postgres.port, state.host, pg.user, pg.database
        ).conninfo
    except CatalogNotStarted as exc:
        _fail(str(exc))


def _run(conninfo: str | None, action: Callable[[psycopg.Connection], T]) -> T:
    try:
        with psycopg.connect(
            conninfo or _stack_conninfo(), autocommit=True, connect_timeout=10
        ) as conn:
            return action(conn)
    except psycopg.Error as exc:
        _fail(f"catalog database: {str(exc).strip()}")


@apikeys_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="Who or what the key is for.")],
    admin: Annotated[bool, typer.Option("--admin", help="May call the admin endpoints.")] = False,
    rate_limit: Annotated[
        float | None,
        typer.Option("--rate-limit", help="Requests per second, > 0 (default: no limit)."),
    ] = None,
    conninfo: ConninfoOpt = None,
) -> None:
    """Create a key and print it: the only time it is shown (only its hash is stored)."""
    if not name.strip():
        _fail("--name must not be empty")
    if rate_limit is not None and not rate_limit > 0:
        _fail("--rate-limit must be positive (leave it out for no limit)")
    key, token = _run(conninfo, lambda conn: create_api_key(conn, name, admin, rate_limit))
    limit = f"{key.rate_limit_per_s:g}/s" if key.rate_limit_per_s is not None else "none"
    typer.echo(
        f"created API key {key.key_id} (name={key.name!r}, admin={key.is_admin}, "
        f"rate limit={limit}); store it now, it cannot be shown again:",
        err=True,
    )
    typer.echo(token)


@apikeys_app.command("list")
def list_(conninfo: ConninfoOpt = None) -> None:
    """List every key (never its secret), revoked ones included."""
    records = _run(conninfo, list_api_keys)
    if not records:
        typer.echo("no API keys")
        return
    rows = [("KEY ID", "NAME", "ADMIN", "RATE LIMIT", "CREATED", "REVOKED")]
    for r in records:
        rows.append(
            (
                r.key_id,
                r.name,
                "yes" if r.is_admin else "no",
                f"{r.rate_limit_per_s:g}/s" if r.rate_limit_per_s is not None else "-",
                f"{r.created_at:%Y-%m-%d %H:%M:%S%z}",
                f"{r.revoked_at:%Y-%m-%d %H:%M:%S%z}" if r.revoked_at is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@apikeys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="Key id, as shown by `rtinfer apikeys list`.")],
    conninfo: ConninfoOpt = None,
) -> None:
    """Revoke a key; gateways stop accepting it within their cache TTL (60 s by default)."""
    try:
        revoked = _run(conninfo, lambda conn: revoke_api_key(conn, key_id))
    except KeyNotFound as exc:
        _fail(str(exc))
    if revoked:
        typer.echo(f"revoked {key_id}; gateways reject it once their cache entry expires (60 s)")
    else:
        typer.echo(f"{key_id} was already revoked")
