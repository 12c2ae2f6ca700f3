"""A private PostgreSQL instance for the model catalog (no system service needed).

Layout of ``data_dir``::

    pgdata/          the cluster (initdb), owned by the server's OS user, mode 0700
    socket/          the unix socket directory (``-k``); clients here use TCP on loopback
    password         generated password of both roles (``postgres`` and the app role), 0600
    postgres.log     server output

Authentication is ``scram-sha-256`` for every connection (TCP and unix socket): initdb sets the
bootstrap superuser ``postgres``'s password from the generated ``password`` file, and the app
role (default ``rtinfer``, owner of the app database) gets the same password. Read it back with
:func:`dsn`.

PostgreSQL refuses to run as root. When we are root, initdb and the server run as the
unprivileged ``postgres`` OS user (created by Debian's ``postgresql`` package) through
``setpriv``, which execs in place so the supervised pid is the postmaster itself; ``data_dir``
is then handed to that user. Otherwise everything runs as the current user.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg
from psycopg import sql

from gateway.catalog.dsn import PostgresDsn, password_file
from rtinfer.procs import Launch, Process, ProcessError, ProgramSpec, spawn_program, wait_until

log = logging.getLogger(__name__)

#: the bootstrap superuser initdb creates
SUPERUSER = "postgres"
#: OS user the server runs as when we are root (Debian's postgresql package creates it)
SERVER_OS_USER = "postgres"
#: unix socket paths are limited to 107 bytes (sun_path)
_MAX_SOCKET_PATH = 107


def postgres_bin_dir() -> Path:
    """The directory holding ``initdb`` and ``postgres``; Debian's newest major version first."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bin_dir in candidates:
        if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
            return bin_dir
    raise ProcessError(
        "PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin "
        "or on PATH; install Debian's postgresql package (apt-get install postgresql)"
    )


def start_postgres(
    data_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    user: str = "rtinfer",
    database: str = "rtinfer",
    startup_timeout_s: float = 60.0,
    launch: Launch = spawn_program,
) -> Process:
    """Start postgres on ``host:port`` with its files in ``data_dir``; ready for ``dsn(...)``.

    Runs initdb on first use, starts the server in the foreground as a supervised process,
    waits until it accepts connections and creates the login role ``user`` owning
    ``database`` if they are missing. Stop it with :func:`stop_postgres`.
    """
    data_dir = data_dir.resolve()
    bin_dir = postgres_bin_dir()
    owner = _server_owner()
    runas = _runas_prefix(owner)
    pgdata, socket_dir, pw_file = data_dir / "pgdata", data_dir / "socket", password_file(data_dir)

    socket_path = socket_dir / f".s.PGSQL.{port}"
    if len(str(socket_path)) > _MAX_SOCKET_PATH:
        raise ProcessError(
            f"unix socket path {socket_path} is longer than {_MAX_SOCKET_PATH} bytes; "
            "use a shorter data dir"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    socket_dir.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        _check_reachable(data_dir, owner)
        for path in (data_dir, socket_dir):
            os.chown(path, owner.pw_uid, owner.pw_gid)

    if not (pgdata / "PG_VERSION").exists():
        _write_password(pw_file, owner)
        _initdb(bin_dir, pgdata, pw_file, runas, cwd=data_dir)
    elif not pw_file.exists():
        raise ProcessError(
            f"{pgdata} is initialized but {pw_file} is missing; "
            f"remove {data_dir} to start from an empty cluster"
        )

    argv = [
        *runas,
        str(bin_dir / "postgres"),
        "-D", str(pgdata),
        "-p", str(port),
        "-k", str(socket_dir),
        "-c", f"listen_addresses={host}",
    ]  # fmt: skip
    spec = ProgramSpec(
        "postgres",
        argv,
        data_dir / "postgres.log",
        cwd=data_dir,
        stop_signal=signal.SIGINT,  # fast shutdown; see stop_postgres
        stop_timeout_s=30.0,
    )
    proc = launch(spec)
    try:
        admin = PostgresDsn(host, port, SUPERUSER, "postgres", pw_file.read_text().strip())
        wait_until(
            lambda: psycopg.pq.PGconn.ping(admin.conninfo.encode()) == psycopg.pq.Ping.OK,
            timeout_s=startup_timeout_s,
            proc=proc,
            what="postgres to accept connections",
        )
        _ensure_role_and_database(admin, user, database)
    except BaseException:
        stop_postgres(proc)
        raise
    return proc


def stop_postgres(proc: Process, timeout_s: float = 30.0) -> None:
    """Fast shutdown (SIGINT): roll back open transactions, disconnect clients, checkpoint.

    Use this rather than ``proc.stop()``: SIGTERM is postgres's smart shutdown, which waits
    for every client to disconnect (backends run in their own process groups, so the group
    signal does not reach them). With a connection pool open it never finishes, and
    ``ManagedProcess.stop`` ends up SIGKILLing the postmaster: crash recovery on next start.
    Works on a ``ManagedProcess`` rebuilt from a pid file too.
    """
    proc.stop(timeout_s=timeout_s, sig=signal.SIGINT)


def _server_owner() -> pwd.struct_passwd | None:
    """The OS user to run as when we are root; ``None`` means "as ourselves"."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise ProcessError(
            f"running as root, but PostgreSQL refuses to run as root and there is no "
            f"{SERVER_OS_USER!r} OS user to run it as; install Debian's postgresql package "
            "or run as an unprivileged user"
        ) from None


def _runas_prefix(owner: pwd.struct_passwd | None) -> list[str]:
    if owner is None:
        return []
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [
        setpriv,
        f"--reuid={owner.pw_uid}",
        f"--regid={owner.pw_gid}",
        "--init-groups",
        "--",
    ]


def _check_reachable(data_dir: Path, owner: pwd.struct_passwd) -> None:
    """Every parent of ``data_dir`` must be searchable by the server's OS user."""
    gids = set(os.getgrouplist(owner.pw_name, owner.pw_gid))
    for parent in data_dir.parents:
        st = parent.stat()
        if st.st_uid == owner.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid in gids:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            group = grp.getgrgid(st.st_gid).gr_name
            raise ProcessError(
                f"the {owner.pw_name!r} OS user (postgres must not run as root) cannot reach "
                f"{data_dir}: {parent} is mode {st.st_mode & 0o777:o} owned by "
                f"{pwd.getpwuid(st.st_uid).pw_name}:{group}; use a data dir it can traverse"
            )


def _write_password(pw_file: Path, owner: pwd.struct_passwd | None) -> None:
    fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(24) + "\n")
    os.chmod(pw_file, 0o600)
    if owner is not None:
        # initdb reads it as the server's OS user
        os.chown(pw_file, owner.pw_uid, owner.pw_gid)


def _initdb(bin_dir: Path, pgdata: Path, pw_file: Path, runas: list[str], cwd: Path) -> None:
    argv = [
        *runas,
        str(bin_dir / "initdb"),
        "-D", str(pgdata),
        "-U", SUPERUSER,
        "--auth=scram-sha-256",
        f"--pwfile={pw_file}",
        "--encoding=UTF8",
        "--no-locale",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)
    if done.returncode != 0:
        out = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise ProcessError(f"initdb failed (exit {done.returncode}):\n{out}")
    log.info("initdb %s in %.1fs", pgdata, time.monotonic() - started)


def _ensure_role_and_database(admin: PostgresDsn, user: str, database: str) -> None:
    try:
        conn = psycopg.connect(admin.conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        raise ProcessError(f"cannot connect to postgres as {admin.user}: {e}") from e
    with conn:
        role_exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
        if role_exists is None:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(user), sql.Literal(admin.password)
                )
            )
            log.info("created postgres role %s", user)
        db_exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if db_exists is None:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(database), sql.Identifier(user)
                )
            )
            log.info("created postgres database %s owned by %s", database, user)
