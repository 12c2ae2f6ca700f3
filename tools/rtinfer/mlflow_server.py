"""A private MLflow tracking server: the model registry of the local stack.

The server keeps runs and registered models in SQLite (``<dir>/mlflow.db``; webhooks need a
SQL store) and serves artifacts itself (``--serve-artifacts``) from ``<dir>/artifacts``, so a
client needs only the HTTP address: uploads and downloads go through ``mlflow-artifacts:/``.

Starting takes ~12 s on a 2-core box, so the stack spawns it early (``spawn_mlflow``) and
waits for ``/health`` later (``wait_mlflow``) while other services start.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import httpx

from rtinfer.procs import ManagedProcess, ProcessError, spawn, wait_until

log = logging.getLogger(__name__)

#: Local stack only: MLflow refuses webhook targets on http:// and on private/loopback
#: addresses by default, and its docs mark both switches as unsafe for production. The
#: stack's webhook receivers listen on plain HTTP on 127.0.0.1, hence these settings.
LOCAL_WEBHOOK_ENV = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
}


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
    data_dir: Path, port: int, host: str = "127.0.0.1", workers: int = 1
) -> ManagedProcess:
    """Start ``mlflow server`` on ``host:port`` with its store in ``data_dir``; do not wait."""
    data_dir.mkdir(parents=True, exist_ok=True)
    artifacts = data_dir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    argv = [
        mlflow_binary(), "server",
        "--backend-store-uri", f"sqlite:///{data_dir / 'mlflow.db'}",
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip
    env = {**os.environ, **LOCAL_WEBHOOK_ENV}
    return spawn("mlflow", argv, data_dir / "mlflow.log", env=env, cwd=data_dir)


def wait_mlflow(
    proc: ManagedProcess, port: int, host: str = "127.0.0.1", timeout_s: float = 90.0
) -> None:
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
) -> ManagedProcess:
    """Start the server and return once ``/health`` answers."""
    proc = spawn_mlflow(data_dir, port, host, workers)
    wait_mlflow(proc, port, host, startup_timeout_s)
    return proc
