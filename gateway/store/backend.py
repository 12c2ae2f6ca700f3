"""One interface over both stores: a ClickHouse server (clickhouse-connect) and embedded chdb.

:func:`open_store` picks the implementation from the URL:

- ``http(s)://[user:password@]host:port/database``: a ClickHouse server, or the local stack's
  embedded server (``gateway.store.server``), through clickhouse-connect over HTTP;
- ``chdb:///abs/path?database=rtinfer``: the embedded engine inside this process. Its data
  directory is locked by one process at a time, so only the embedded server (or a tool run
  while the stack is down) opens it this way.

Both take the same SQL: server-side parameters (``{name:String}``), JSONEachRow inserts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

Params = Mapping[str, Any] | None


class StoreError(RuntimeError):
    """A store call failed. ``transient``: the store was unreachable (retry), else the
    statement or its data was refused."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class Store(Protocol):
    database: str

    def command(self, sql: str, params: Params = None) -> None: ...

    def raw(self, sql: str, params: Params = None, fmt: str = "JSONEachRow") -> bytes: ...

    def insert_json(self, table: str, lines: bytes) -> None: ...

    def close(self) -> None: ...


def rows(store: Store, sql: str, params: Params = None) -> list[dict[str, Any]]:
    """The result rows of ``sql`` as dicts (JSONEachRow, 64-bit integers as numbers)."""
    body = store.raw(sql, params, "JSONEachRow")
    return [orjson.loads(line) for line in body.splitlines() if line]


class ChdbStore:
    """The embedded engine (chdb) on a data directory, inside this process."""

    def __init__(self, path: Path, database: str) -> None:
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        self.database = database
        self._lock = threading.Lock()  # one chdb session serves one query at a time
        try:
            self._session = session.Session(str(path))
        except Exception as exc:  # the directory is locked by another process
            raise StoreError(f"chdb cannot open {path}: {exc}", transient=False) from exc
        self._query(f"CREATE DATABASE IF NOT EXISTS {_ident(database)}", None, "CSV")
        self._query(f"USE {_ident(database)}", None, "CSV")

    def _query(self, sql: str, params: Params, fmt: str) -> bytes:
        with self._lock:
            try:
                if params:
                    result = self._session.query(sql, fmt, params=_text_params(params))
                else:
                    result = self._session.query(sql, fmt)
            except Exception as exc:
                raise StoreError(str(exc).strip(), transient=False) from exc
        return result.bytes() if result is not None else b""

    def command(self, sql: str, params: Params = None) -> None:
        self._query(sql, params, "CSV")

    def raw(self, sql: str, params: Params = None, fmt: str = "JSONEachRow") -> bytes:
        return self._query(sql, params, fmt)

    def insert_json(self, table: str, lines: bytes) -> None:
        if lines:
            self._query(
                f"INSERT INTO {_ident(table)} FORMAT JSONEachRow\n{lines.decode()}", None, "CSV"
            )

    def close(self) -> None:
        with self._lock:
            self._session.close()


class ClickHouseStore:
    """A ClickHouse server's HTTP interface through clickhouse-connect."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        import clickhouse_connect
        from clickhouse_connect.driver import exceptions

        parts = urlsplit(url)
        self.database = parts.path.strip("/") or "default"
        self._errors = exceptions
        self._lock = threading.Lock()  # a clickhouse-connect client is not thread-safe
        try:
            admin = self._client(clickhouse_connect, parts, "default", timeout_s)
            admin.command(f"CREATE DATABASE IF NOT EXISTS {_ident(self.database)}")
            admin.close()
            self._ch = self._client(clickhouse_connect, parts, self.database, timeout_s)
        except exceptions.Error as exc:
            raise self._error(exc) from exc

    @staticmethod
    def _client(module: Any, parts: Any, database: str, timeout_s: float) -> Any:
        return module.get_client(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8443 if parts.scheme == "https" else 8123),
            username=unquote(parts.username or "default"),
            password=unquote(parts.password or ""),
            database=database,
            secure=parts.scheme == "https",
            compress=False,
            connect_timeout=timeout_s,
            send_receive_timeout=timeout_s,
            autogenerate_session_id=False,
        )

    def _error(self, exc: Exception) -> StoreError:
        transient = isinstance(exc, self._errors.OperationalError)
        return StoreError(str(exc).strip(), transient=transient)

    def command(self, sql: str, params: Params = None) -> None:
        with self._lock:
            try:
                self._ch.command(sql, parameters=dict(params) if params else None)
            except self._errors.Error as exc:
                raise self._error(exc) from exc

    def raw(self, sql: str, params: Params = None, fmt: str = "JSONEachRow") -> bytes:
        with self._lock:
            try:
                return bytes(
                    self._ch.raw_query(sql, parameters=dict(params) if params else None, fmt=fmt)
                )
            except self._errors.Error as exc:
                raise self._error(exc) from exc

    def insert_json(self, table: str, lines: bytes) -> None:
        if not lines:
            return
        with self._lock:
            try:
                self._ch.raw_insert(table, insert_block=lines, fmt="JSONEachRow")
            except self._errors.Error as exc:
                raise self._error(exc) from exc

    def close(self) -> None:
        with self._lock:
            self._ch.close()


def open_store(url: str, *, timeout_s: float = 10.0) -> ChdbStore | ClickHouseStore:
    """The store at ``url`` (see the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        database = parse_qs(parts.query).get("database", ["rtinfer"])[-1]
        return ChdbStore(Path(unquote(parts.netloc + parts.path)), database)
    if parts.scheme in ("http", "https"):
        return ClickHouseStore(url, timeout_s=timeout_s)
    raise ValueError(f"store URL {redact(url)!r}: the scheme must be http, https or chdb")


def redact(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"{name!r} is not a plain identifier")
    return name


def _text_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Parameter values as ClickHouse reads them: lists of strings as ``['a','b']``."""
    return {k: _text(v) for k, v in params.items()}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_quoted(v) if isinstance(v, str) else _text(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return orjson.dumps(value).decode()


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
