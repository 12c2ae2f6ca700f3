"""A private redis-server for the online features (no system service needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from rtinfer.procs import Launch, Process, ProcessError, ProgramSpec, spawn_program, wait_until


def redis_binary() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        raise ProcessError("redis-server not found; install Debian's redis-server package")
    return path


def redis_program(data_dir: Path, port: int, host: str = "127.0.0.1") -> ProgramSpec:
    """redis-server on ``host:port`` with its files in ``data_dir``.

    The append-only file (fsync every second) keeps features, rate-limit buckets and async
    results across a crash and restart of the server.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_binary(),
        "--port", str(port),
        "--bind", host,
        "--dir", str(data_dir),
        "--dbfilename", "features.rdb",
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--appenddirname", "appendonly",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--maxclients", "10000",
    ]  # fmt: skip
    return ProgramSpec("redis", argv, data_dir / "redis.log", cwd=data_dir)


def start_redis(
    data_dir: Path, port: int, host: str = "127.0.0.1", launch: Launch = spawn_program
) -> Process:
    """Start redis-server on ``host:port`` with its files in ``data_dir``; wait for PING."""
    proc = launch(redis_program(data_dir, port, host))
    client = redis.Redis(host=host, port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    wait_until(lambda: bool(client.ping()), timeout_s=15, proc=proc, what="redis PING")
    client.close()
    return proc
