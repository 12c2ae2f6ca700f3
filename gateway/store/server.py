"""``python -m gateway.store.server``: the embedded engine (chdb) behind ClickHouse's HTTP
interface, so the local stack's sinks, gateway and tools use the store exactly as they use a
ClickHouse server in production (clickhouse-connect, same SQL).

It serves what those clients send: ``GET /ping``, and statements in the ``query`` parameter
and/or the body, with ``database``, ``default_format`` and ``param_<name>`` (server-side
parameters); inserts in a text format (JSONEachRow) with the data in the body. Other
ClickHouse settings in the URL are ignored. Statements run one at a time on one chdb session
over ``<state_dir>/clickhouse``; the data directory is locked while the server runs.
Errors answer like ClickHouse's: status 500 (400 for a request it cannot read), the
``X-ClickHouse-Exception-Code`` header and the message as the body. It listens on loopback
only and has no authentication: it is not meant to be exposed.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from gateway.logs import configure_logging
from gateway.settings import Settings
from gateway.store.backend import ChdbStore, StoreError

log = logging.getLogger("gateway.store.server")

_CODE = re.compile(r"Code: (\d+)")
_BINARY_INSERT = re.compile(
    r"^\s*INSERT\b.*\bFORMAT\s+(Native|RowBinary\w*|Parquet|Arrow\w*)\b", re.I | re.S
)


class _Engine:
    """The chdb session plus the database each statement runs in."""

    def __init__(self, path: Path, database: str) -> None:
        self.store = ChdbStore(path, database)
        self._current = database
        self._lock = threading.Lock()

    def run(self, sql: str, database: str | None, params: dict[str, str], fmt: str) -> bytes:
        with self._lock:
            if database and database != self._current:
                self.store.execute_text(f"USE `{database.replace('`', '')}`", None, "CSV")
                self._current = database
            return self.store.execute_text(sql, params or None, fmt)


class _Handler(BaseHTTPRequestHandler):
    engine: _Engine
    protocol_version = "HTTP/1.1"

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

    def _statement(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Encoding", "identity") != "identity":
            self._answer(400, b"compressed requests are not supported; use compress=False", 1)
            return
        args = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        try:
            text = body.decode()
        except UnicodeDecodeError:
            self._answer(
                400,
                b"the body must be UTF-8 text (binary insert formats are "
                b"not supported: use JSONEachRow)",
                1,
            )
            return
        sql = f"{args['query']}\n{text}" if "query" in args else text
        if not sql.strip() or _BINARY_INSERT.match(sql):
            self._answer(400, b"no statement, or an insert in a binary format", 1)
            return
        params = {k[len("param_") :]: v for k, v in args.items() if k.startswith("param_")}
        fmt = args.get("default_format", "TabSeparated")
        try:
            out = self.engine.run(sql, args.get("database"), params, fmt)
        except StoreError as exc:
            message = str(exc)
            code = _CODE.search(message)
            self._answer(500, message.encode() + b"\n", int(code.group(1)) if code else 1)
            return
        self._answer(200, out)

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
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(settings, stop)


if __name__ == "__main__":
    main()
