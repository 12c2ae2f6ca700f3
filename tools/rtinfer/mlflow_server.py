"""A private MLflow tracking server: the model registry of the local stack.

The server keeps runs and registered models in SQLite (``<dir>/mlflow.db``; webhooks need a
SQL store) and serves artifacts itself (``--serve-artifacts``) from ``<dir>/artifacts``, so a
client needs only the HTTP address: uploads and downloads go through ``mlflow-artifacts:/``.

MLflow encrypts the webhook secrets it stores with ``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY``;
unset, each server process makes up a key and cannot read what an earlier one stored (every
webhook listing then answers HTTP 500). The key is therefore generated once per store and
kept beside it (``<dir>/webhook-encryption-key``, mode 0600).

The server's job runner (huey consumers for MLflow's own background jobs, about 290 MB each)
is switched off: nothing in the stack uses it.

Starting takes ~12 s on a 2-core box, so the stack spawns it early (``spawn_mlflow``) and
waits for ``/health`` later (``wait_mlflow``) while other services start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from gateway.secret_files import read_or_create_secret
from rtinfer.procs import Launch, Process, ProcessError, ProgramSpec, spawn_program, wait_until

log = logging.getLogger(__name__)

#: Local stack only: MLflow refuses webhook targets on http:// and on private/loopback
#: addresses by default, and its docs mark both switches as unsafe for production. The
#: stack's webhook receivers listen on plain HTTP on 127.0.0.1, hence these settings.
LOCAL_WEBHOOK_ENV = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
}
#: what the local server does not need
LEAN_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
ENCRYPTION_KEY_FILE = "webhook-encryption-key"
STORE_FILE = "mlflow.db"


def encryption_key(data_dir: Path) -> str:
    """The store's webhook-secret encryption key, created (and older webhooks dropped) once."""
    path = data_dir / ENCRYPTION_KEY_FILE
    if not path.exists():
        drop_unreadable_webhooks(data_dir / STORE_FILE)
    return read_or_create_secret(path, lambda: Fernet.generate_key().decode())


def drop_unreadable_webhooks(store: Path) -> int:
    """Delete the webhooks of a store written without a persisted key: their secrets were
    encrypted with a key nobody has any more. The stack registers its webhook again."""
    if not store.exists():
        return 0
    with contextlib.closing(sqlite3.connect(store)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "webhooks" not in tables:
            return 0
        with conn:
            if "webhook_events" in tables:
                conn.execute("DELETE FROM webhook_events")
            n = conn.execute("DELETE FROM webhooks").rowcount
    if n:
        log.warning("dropped %d MLflow webhooks whose secrets no key can decrypt", n)
    return n


def mlflow_binary() -> str:
    """The ``mlflow`` entry point of the running interpreter's environment."""
    path = Path(sys.executable).parent / "mlflow"
    if not path.exists():
        raise ProcessError(f"{path} not found; install the project's dependencies (mlflow)")
    return str(path)


def tracking_uri(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def healthy(uri: str, timeout_s: float = 1.0) -> bool:
    """``GET /health`` answers 200."""
    try:
        return httpx.get(f"{uri}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def spawn_mlflow(
    data_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    workers: int = 1,
    launch: Launch = spawn_program,
) -> Process:
    """Start ``mlflow server`` on ``host:port`` with its store in ``data_dir``; do not wait."""
    data_dir.mkdir(parents=True, exist_ok=True)
    artifacts = data_dir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    argv = [
        mlflow_binary(), "server",
        "--backend-store-uri", f"sqlite:///{data_dir / STORE_FILE}",
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip
    env = {
        **os.environ,
        **LOCAL_WEBHOOK_ENV,
        **LEAN_ENV,
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": encryption_key(data_dir),
    }
    return launch(ProgramSpec("mlflow", argv, data_dir / "mlflow.log", env=env, cwd=data_dir))


def wait_mlflow(proc: Process, port: int, host: str = "127.0.0.1", timeout_s: float = 90.0) -> None:
    """Wait until the server answers ``/health``; stop it if it does not."""
    started = time.monotonic()
    uri = tracking_uri(host, port)
    try:
        wait_until(
            lambda: healthy(uri),
            timeout_s=timeout_s,
            proc=proc,
            what="MLflow /health",
            interval_s=0.25,
        )
    except BaseException:
        proc.stop()
        raise
    log.info("mlflow ready on %s (waited %.1fs)", uri, time.monotonic() - started)


def start_mlflow(
    data_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    workers: int = 1,
    startup_timeout_s: float = 90.0,
    launch: Launch = spawn_program,
) -> Process:
    """Start the server and return once ``/health`` answers."""
    proc = spawn_mlflow(data_dir, port, host, workers, launch)
    wait_mlflow(proc, port, host, startup_timeout_s)
    return proc
