"""``python -m gateway.store.server``: the embedded engine (chdb) behind ClickHouse's HTTP
interface, so the local stack's sinks, gateway and tools use the store exactly as they use a
ClickHouse server in production (clickhouse-connect, same SQL).

It serves what those clients send: ``GET /ping``; a statement in the ``query`` parameter or
the body, with ``database``, ``default_format`` and ``param_<name>`` (server-side
parameters); and ``INSERT INTO t [(columns)] FORMAT <any format>`` in ``query`` with the data
as the body (JSONEachRow, Native, RowBinary, Parquet...). The data is staged in a file and
read with ``file()``, which parses it about twice as fast as inline data. Other ClickHouse
settings in the URL are ignored. Statements run one at a time on one chdb session over
``<state_dir>/clickhouse``, whose directory is locked while the server runs. Errors answer
like ClickHouse's: status 500 (400 for a request it cannot read), the
``X-ClickHouse-Exception-Code`` header, the message as the body. It listens on loopback only
and has no authentication: it is not meant to be exposed.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from gateway.logs import configure_logging
from gateway.settings import Settings
from gateway.store.backend import ChdbStore, StoreError, rows
from gateway.store.signals import stop_on_signals

log = logging.getLogger("gateway.store.server")

_CODE = re.compile(r"Code: (\d+)")
_INSERT = re.compile(
    r"^\s*INSERT\s+INTO\s+(?P<table>[\w.`]+)\s*(?:\((?P<columns>[^)]*)\))?\s*"
    r"FORMAT\s+(?P<format>\w+)\s*$",
    re.I | re.S,
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Engine:
    """The chdb session, the database each statement runs in, and staged inserts."""

    def __init__(self, path: Path, database: str) -> None:
        self.store = ChdbStore(path, database)
        self._current = database
        self._lock = threading.Lock()
        self._staging = path / "user_files" / "staged-inserts"
        self._staging.mkdir(parents=True, exist_ok=True)
        for stale in self._staging.iterdir():  # left by a crash mid-insert
            stale.unlink()

    def run(self, sql: str, database: str | None, params: dict[str, str], fmt: str) -> bytes:
        with self._lock:
            self._use(database)
            return self.store.raw(sql, params or None, fmt)

    def insert(
        self, database: str | None, table: str, columns: str | None, fmt: str, data: bytes
    ) -> None:
        """``INSERT INTO table (columns) FORMAT fmt`` with ``data``, through a staged file."""
        staged = self._staging / f"{uuid.uuid4().hex}.{fmt}"
        staged.write_bytes(data)
        try:
            with self._lock:
                self._use(database)
                names, structure = self._structure(table, columns)
                self.store.raw(
                    f"INSERT INTO {table} ({names}) SELECT * FROM "
                    f"file('{staged}', {fmt}, '{structure}')",
                    None,
                    "CSV",
                )
        finally:
            staged.unlink(missing_ok=True)

    def _use(self, database: str | None) -> None:
        if database and database != self._current:
            if not _NAME.match(database):
                raise StoreError(
                    f"Code: 81. database {database!r} is not a plain name", transient=False
                )
            self.store.raw(f"USE {database}", None, "CSV")
            self._current = database

    def _structure(self, table: str, columns: str | None) -> tuple[str, str]:
        """The insert's column list and their types: the named ones, else every column
        without a DEFAULT (which the table then fills)."""
        name = table.replace("`", "").split(".")[-1]
        found = rows(
            self.store,
            "SELECT name, type, default_kind FROM system.columns "
            "WHERE database = currentDatabase() AND table = {t:String} ORDER BY position",
            {"t": name},
        )
        if not found:
            raise StoreError(f"Code: 60. Table {table} does not exist", transient=False)
        types = {c["name"]: c["type"] for c in found}
        if columns:
            wanted = [c.strip().strip("`") for c in columns.split(",")]
        else:
            wanted = [c["name"] for c in found if not c["default_kind"]]
        unknown = [c for c in wanted if c not in types]
        if unknown:
            raise StoreError(f"Code: 16. No such columns {unknown} in {table}", transient=False)
        names = ", ".join(f"`{c}`" for c in wanted)
        structure = ", ".join(f"`{c}` {types[c]}" for c in wanted)
        return names, structure.replace("\\", "\\\\").replace("'", "\\'")


class _Handler(BaseHTTPRequestHandler):
    engine: _Engine
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle's algorithm holds the
        # second until the client's delayed ACK, 40 ms per statement
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug(fmt, *args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path in ("/ping", "/") and "query" not in parse_qs(url.query):
            self._answer(200, b"Ok.\n")
            return
        self._statement()

    def do_POST(self) -> None:
        self._statement()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _statement(self) -> None:
        body = self._body()
        if self.headers.get("Content-Encoding", "identity") != "identity":
            self._answer(400, b"compressed requests are not supported; use compress=False", 1)
            return
        args = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        if "query" not in args and body[:6].upper() == b"INSERT":
            # the statement's first line, then its data (as clickhouse-connect's insert sends)
            head, _, body = body.partition(b"\n")
            args["query"] = head.decode(errors="replace")
        insert = _INSERT.match(args.get("query", ""))
        try:
            if insert is not None:
                self.engine.insert(
                    args.get("database"), insert["table"], insert["columns"], insert["format"], body
                )
                self._answer(200, b"")
                return
            sql = self._sql(args, body)
            if sql is None:
                return
            params = {k[len("param_") :]: v for k, v in args.items() if k.startswith("param_")}
            fmt = args.get("default_format", "TabSeparated")
            out = self.engine.run(sql, args.get("database"), params, fmt)
        except StoreError as exc:
            message = str(exc)
            code = _CODE.search(message)
            self._answer(500, message.encode() + b"\n", int(code.group(1)) if code else 1)
            return
        self._answer(200, out)

    def _sql(self, args: dict[str, str], body: bytes) -> str | None:
        try:
            text = body.decode()
        except UnicodeDecodeError:
            self._answer(
                400,
                b"a statement must be UTF-8 text; send data with "
                b"query=INSERT INTO t FORMAT <format>",
                1,
            )
            return None
        sql = f"{args['query']}\n{text}" if "query" in args else text
        if not sql.strip():
            self._answer(400, b"no statement", 1)
            return None
        return sql

    def _answer(self, status: int, body: bytes, error_code: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        if error_code is not None:
            self.send_header("X-ClickHouse-Exception-Code", str(error_code))
        self.end_headers()
        self.wfile.write(body)


def data_dir(settings: Settings) -> Path:
    return settings.state_dir / "clickhouse"


def serve(settings: Settings, stop: threading.Event) -> None:
    cfg = settings.store
    engine = _Engine(data_dir(settings), cfg.database)
    handler = type("Handler", (_Handler,), {"engine": engine})
    server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="store-http", daemon=True)
    thread.start()
    log.info("embedded store (chdb %s) on http://%s:%d", data_dir(settings), cfg.host, cfg.port)
    stop.wait()
    server.shutdown()
    engine.store.close()


def main(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings.gateway.log_level)
    stop = stop_on_signals()
    serve(settings, stop)


if __name__ == "__main__":
    main()
