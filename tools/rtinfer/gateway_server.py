"""The gateway as a stack service: ``python -m gateway`` with the stack's effective settings.

Child processes (the gateway, async workers) get the *resolved* settings of ``stack up`` —
free ports filled in — as one ``RTINFER_<SECTION>`` JSON variable per top-level section, so
they see exactly what the stack started, whatever mix of files, env and code configured it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretBytes, SecretStr

from gateway.settings import REPO_ROOT, Settings
from rtinfer.procs import Launch, Process, ProgramSpec, spawn_program, wait_until

ENV_PREFIX = "RTINFER_"


def _plain(value: object) -> Any:
    if isinstance(value, (SecretStr, SecretBytes)):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's env) without ``RTINFER_*``, plus ``settings`` as JSON.

    Secrets are written in clear: the variables only reach the child's environment.
    """
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith(ENV_PREFIX)}
    for name, value in settings.model_dump(mode="python").items():
        if isinstance(value, (dict, list)):
            text = json.dumps(value, default=_plain)  # complex fields are read as JSON
        else:
            text = str(_plain(value) if isinstance(value, (Path, SecretStr)) else value)
        env[f"{ENV_PREFIX}{name.upper()}"] = text
    return env


def gateway_url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def spawn_module(
    name: str,
    module: str,
    settings: Settings,
    log_path: Path,
    *,
    launch: Launch = spawn_program,
    cwd: Path = REPO_ROOT,
) -> Process:
    """``python -m <module>`` with ``settings`` in its environment (not waited for). ``cwd``
    holds the code it runs (another checkout, for A/B benchmarks)."""
    spec = ProgramSpec(
        name,
        [sys.executable, "-m", module],
        log_path,
        env=settings_env(settings),
        cwd=cwd,
        stop_timeout_s=30.0,  # shutdown flushes the prediction log and drains jobs
    )
    return launch(spec)


def wait_answering(proc: Process, name: str, ready_url: str, timeout_s: float) -> None:
    """Return once ``ready_url`` answers 200; stop ``proc`` if it does not within
    ``timeout_s``."""

    def ready() -> bool:
        return httpx.get(ready_url, timeout=2.0).status_code == 200

    try:
        wait_until(ready, timeout_s, proc=proc, what=f"{name} {ready_url}")
    except BaseException:
        proc.stop(timeout_s=10)
        raise


def spawn_settled(
    name: str,
    module: str,
    settings: Settings,
    log_path: Path,
    ready_url: str,
    *,
    startup_timeout_s: float = 60.0,
    launch: Launch = spawn_program,
    cwd: Path = REPO_ROOT,
) -> Process:
    """:func:`spawn_module`, returned once ``ready_url`` answers 200 (stopped again if it does
    not within ``startup_timeout_s``)."""
    proc = spawn_module(name, module, settings, log_path, launch=launch, cwd=cwd)
    wait_answering(proc, name, ready_url, startup_timeout_s)
    return proc


def start_gateway(
    settings: Settings,
    triton_grpc_url: str,
    *,
    startup_timeout_s: float = 60.0,
    launch: Launch = spawn_program,
) -> Process:
    """Start ``python -m gateway`` on ``settings.gateway.host:port``; wait for ``/readyz``.

    ``settings`` must already hold the stack's resolved ports.
    """
    gw = settings.gateway.model_copy(update={"triton_grpc_url": triton_grpc_url})
    settings = settings.model_copy(update={"gateway": gw})
    return spawn_settled(
        "gateway",
        "gateway",
        settings,
        settings.state_dir / "gateway" / "gateway.log",
        f"{gateway_url(gw.host, gw.port)}/readyz",
        startup_timeout_s=startup_timeout_s,
        launch=launch,
    )
