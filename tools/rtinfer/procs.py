"""Start, watch and stop local server processes (pid files and logs in the state dir)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class ProcessError(RuntimeError):
    """A managed process failed to start or to become healthy."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nobody listens on it (connections lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def resolve_port(port: int, host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """``0`` -> a free port; a configured port must be free."""
    taken = taken if taken is not None else set()
    if port == 0:
        while (p := free_port(host)) in taken:
            pass
        taken.add(p)
        return p
    if port in taken or not port_is_free(port, host):
        raise ProcessError(f"port {port} on {host} is in use; set another or 0 for a free port")
    taken.add(port)
    return port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); reap it if it is ours
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class ProgramSpec:
    """How to run one server process: what a launcher (``spawn_program`` or the stack's
    supervisor) needs to start, stop and restart it."""

    name: str
    argv: Sequence[str]
    log_path: Path
    #: the whole environment of the process; ``None``: the launcher's own
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    #: signal of a clean stop (postgres: INT, its fast shutdown)
    stop_signal: signal.Signals = signal.SIGTERM
    #: how long a clean stop may take before SIGKILL
    stop_timeout_s: float = 20.0
    #: a supervised process that exits sooner after starting counts as a failed start
    start_secs: float = 2.0
    #: a clean stop signals the whole process group (children too); False: only the process,
    #: which stops its children itself (SIGKILL still reaches the group after the timeout)
    signal_group: bool = True


class Process(Protocol):
    """A started server process, spawned directly or run by the stack's supervisor."""

    name: str
    log_path: Path

    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    def stop(self, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> None: ...


#: starts a program: :func:`spawn_program`, or ``Supervisor.add`` in the local stack
Launch = Callable[[ProgramSpec], Process]


@dataclass
class ManagedProcess:
    """A server process started in its own session, logging to a file."""

    name: str
    pid: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def stop(self, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Signal the process group, wait, then SIGKILL what is left."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                return
            time.sleep(0.05)
        log.warning("%s (pid %d) did not stop in %.0fs; killing", self.name, self.pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=10)

    def kill(self) -> None:
        """Hard stop, as a crash would."""
        self.stop(timeout_s=5.0, sig=signal.SIGKILL)


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    log.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
    return ManagedProcess(name=name, pid=popen.pid, log_path=log_path, popen=popen)


def spawn_program(spec: ProgramSpec) -> ManagedProcess:
    """Start ``spec`` directly (unsupervised), in its own session."""
    return spawn(spec.name, spec.argv, spec.log_path, env=spec.env, cwd=spec.cwd)


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    proc: Process | None = None,
    what: str = "condition",
    interval_s: float = 0.1,
) -> None:
    """Poll ``check`` until true; fail early if ``proc`` dies, with its log tail."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if proc is not None and not proc.alive():
            raise ProcessError(
                f"{proc.name} exited while waiting for {what}; log tail:\n{log_tail(proc.log_path)}"
            )
        if time.monotonic() >= deadline:
            tail = f"; log tail:\n{log_tail(proc.log_path)}" if proc is not None else ""
            raise ProcessError(f"timed out after {timeout_s:.0f}s waiting for {what}{tail}")
        time.sleep(interval_s)
