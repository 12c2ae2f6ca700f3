"""A private redis-server for the online features (no system service needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from rtinfer.procs import ManagedProcess, ProcessError, spawn, wait_until


def redis_binary() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        raise ProcessError("redis-server not found; install Debian's redis-server package")
    return path


def start_redis(data_dir: Path, port: int, host: str = "127.0.0.1") -> ManagedProcess:
    """Start redis-server on ``host:port`` with its files in ``data_dir``; wait for PING."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_binary(),
        "--port", str(port),
        "--bind", host,
        "--dir", str(data_dir),
        "--dbfilename", "features.rdb",
        # the online store is rebuilt by `rtinfer features load`; snapshot on shutdown only
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--maxclients", "10000",
    ]  # fmt: skip
    proc = spawn("redis", argv, data_dir / "redis.log")
    client = redis.Redis(host=host, port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    wait_until(lambda: bool(client.ping()), timeout_s=15, proc=proc, what="redis PING")
    client.close()
    return proc
