"""Gateways the door benchmark starts beside the stack's: more workers, another server, or
another commit.

A spec is ``name=workers[:server][@ref]``: ``server`` is ``uvicorn`` (the default) or
``granian``, ``ref`` a commit run from a detached ``git worktree`` (an A/B of two versions in
one run), e.g. ``gateway-2w=2``, ``granian=1:granian`` or ``before=1@HEAD~3``. Each runs
``python -m gateway`` with the running stack's settings on a free port, its own spool slot
and health file, and is stopped (its worktree removed) after.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import Settings
from rtinfer import stack as stack_mod
from rtinfer.gateway_server import gateway_url, spawn_settled
from rtinfer.procs import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GatewaySpec:
    name: str
    workers: int
    ref: str | None = None
    server: str = "uvicorn"

    @classmethod
    def parse(cls, text: str) -> GatewaySpec:
        name, sep, rest = text.partition("=")
        rest, _, ref = rest.partition("@")
        workers, _, server = rest.partition(":")
        if not sep or not name or not workers.isdigit() or int(workers) < 1:
            raise ValueError(f"gateway spec {text!r}: expected name=workers[:server][@git-ref]")
        return cls(name, int(workers), ref or None, server or "uvicorn")


@dataclass(frozen=True)
class Started:
    url: str
    pid: int


@contextmanager
def _checkout(ref: str | None) -> Iterator[Path]:
    if ref is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="door-bench-ref-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
            check=True,
            capture_output=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                check=False,
                capture_output=True,
            )


@contextmanager
def extra_gateways(
    specs: list[GatewaySpec], state: stack_mod.StackState, log_dir: Path
) -> Iterator[dict[str, Started]]:
    """Start each spec's gateway against the running stack; stop them all on exit."""
    base = state.apply(Settings())
    started: dict[str, Started] = {}
    with ExitStack() as stack:
        for spec in specs:
            tree = stack.enter_context(_checkout(spec.ref))
            settings = base.model_copy(deep=True)
            gw = settings.gateway
            gw.port, gw.workers, gw.server = free_port(gw.host), spec.workers, spec.server
            gw.triton_grpc_url = state.triton_ports.grpc_url
            proc = spawn_settled(
                spec.name,
                "gateway",
                settings,
                log_dir / f"{spec.name}.log",
                f"{gateway_url(gw.host, gw.port)}/readyz",
                cwd=tree,
            )
            stack.callback(proc.stop, 30.0)
            started[spec.name] = Started(gateway_url(gw.host, gw.port), proc.pid)
        yield started
