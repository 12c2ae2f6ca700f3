"""The local stack's process supervisor: supervisord (from PyPI) over a unix socket.

``stack up`` starts one ``supervisord`` per state directory, with no program at first; each
service is added when the stack reaches it (:meth:`Supervisor.add` writes
``<state>/supervisor/programs/<name>.conf``, asks supervisord to reload its configuration and
starts the program). From then on supervisord restarts a service that exits unexpectedly
(killed by a signal, or a non-zero exit): at once if it had run for its ``start_secs``, after
1, 2, 3... seconds of backoff while it keeps failing to start, and gives up (``FATAL``) after
``START_RETRIES`` failed starts. A service stopped through the supervisor stays stopped.

Each program runs ``python -m rtinfer.envexec <env file> <log file> <argv>``, which replaces
itself with the real server, so the supervised pid is the server's, the environment is
exactly the one the stack computed (kept, mode 0600, in ``<state>/supervisor/env/<name>.json``)
and the output goes to the service's log file directly, not through supervisord.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shlex
import signal
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from rtinfer.procs import (
    ManagedProcess,
    ProcessError,
    ProgramSpec,
    log_tail,
    pid_alive,
    spawn,
    wait_until,
)

log = logging.getLogger(__name__)

DIR_NAME = "supervisor"
SOCKET_NAME = "supervisor.sock"
#: failed starts in a row before supervisord gives a program up
START_RETRIES = 8
#: states in which a program runs or is about to
LIVE_STATES = frozenset({"STARTING", "RUNNING"})
#: unix socket paths are limited to 107 bytes (sun_path)
_MAX_SOCKET_PATH = 107

_MAIN_CONF = """\
[supervisord]
nodaemon=true
user={user}
logfile={dir}/supervisord.log
logfile_maxbytes=10MB
logfile_backups=2
pidfile={dir}/supervisord.pid
childlogdir={dir}
loglevel=info

[unix_http_server]
file={socket}
chmod=0700

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[include]
files = {dir}/programs/*.conf
"""

_PROGRAM_CONF = """\
[program:{name}]
command={command}
directory={cwd}
autostart=false
autorestart=unexpected
exitcodes=0
startsecs={start_secs}
startretries={retries}
stopsignal={stop_signal}
stopwaitsecs={stop_wait}
stopasgroup={group}
killasgroup=true
redirect_stderr=true
stdout_logfile=NONE
"""


def _conf_value(value: object) -> str:
    """A value for supervisord's ini files (``%`` starts an interpolation there)."""
    return str(value).replace("%", "%%")


class Supervisor:
    """A running supervisord of one state directory, driven over XML-RPC."""

    def __init__(self, state_dir: Path, daemon: ManagedProcess | None = None) -> None:
        self.dir = state_dir.resolve() / DIR_NAME
        self.socket = self.dir / SOCKET_NAME
        self.daemon = daemon
        self._transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        self._rpc: Any = xmlrpc.client.ServerProxy("http://localhost", transport=self._transport)

    def _call(self, method: str, *args: Any) -> Any:
        """One XML-RPC call; a failed connection is dropped (the transport would reuse it)."""
        try:
            return getattr(self._rpc.supervisor, method)(*args)
        except OSError:
            self._transport.close()
            raise

    # -- the daemon ------------------------------------------------------------------------

    @classmethod
    def start(cls, state_dir: Path, timeout_s: float = 30.0) -> Supervisor:
        """Start supervisord for ``state_dir`` (no programs yet); wait until it answers."""
        sup = cls(state_dir)
        if len(str(sup.socket)) > _MAX_SOCKET_PATH:
            raise ProcessError(f"socket path {sup.socket} is too long; use a shorter state dir")
        for sub in ("programs", "env"):
            path = sup.dir / sub
            path.mkdir(parents=True, exist_ok=True)
            for old in path.iterdir():  # programs of a previous stack
                old.unlink()
        sup.socket.unlink(missing_ok=True)
        conf = sup.dir / "supervisord.conf"
        user = pwd.getpwuid(os.geteuid()).pw_name
        conf.write_text(
            _MAIN_CONF.format(
                dir=_conf_value(sup.dir), socket=_conf_value(sup.socket), user=_conf_value(user)
            )
        )
        argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        sup.daemon = spawn("supervisord", argv, sup.dir / "supervisord.out", env=env)
        try:
            wait_until(sup.running, timeout_s, proc=sup.daemon, what="supervisord", interval_s=0.1)
        except BaseException:
            sup.daemon.stop(timeout_s=5)
            raise
        return sup

    def running(self) -> bool:
        """supervisord answers and is in its RUNNING state."""
        try:
            return bool(self._call("getState")["statename"] == "RUNNING")
        except (OSError, xmlrpc.client.Error):
            return False

    def pid(self) -> int:
        return int(self._call("getPID"))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop supervisord (and, if any is still running, every program)."""
        pid = None
        with contextlib.suppress(OSError, xmlrpc.client.Error):
            pid = self.pid()
            self._call("shutdown")
        if pid is not None:
            deadline = time.monotonic() + timeout_s
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                log.warning("supervisord (pid %d) did not exit; killing it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # -- programs --------------------------------------------------------------------------

    def add(self, spec: ProgramSpec) -> SupervisedProcess:
        """Register ``spec`` and start it (without waiting for it to be up)."""
        env_file = self.dir / "env" / f"{spec.name}.json"
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(dict(spec.env if spec.env is not None else os.environ), fh)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = shlex.join(
            [
                sys.executable, "-m", "rtinfer.envexec",
                str(env_file), str(spec.log_path), *map(str, spec.argv),
            ]
        )  # fmt: skip
        conf = _PROGRAM_CONF.format(
            name=spec.name,
            command=_conf_value(command),
            cwd=_conf_value(spec.cwd or self.dir),
            start_secs=max(1, round(spec.start_secs)),
            retries=START_RETRIES,
            stop_signal=spec.stop_signal.name.removeprefix("SIG"),
            stop_wait=max(1, round(spec.stop_timeout_s)),
            group="true" if spec.signal_group else "false",
        )
        (self.dir / "programs" / f"{spec.name}.conf").write_text(conf)
        self._call("reloadConfig")
        with contextlib.suppress(xmlrpc.client.Fault):  # already known: same name re-added
            self._call("addProcessGroup", spec.name)
        self._call("startProcess", spec.name, False)
        proc = SupervisedProcess(self, spec.name, spec.log_path)
        log.info("started %s under supervision (pid %d): %s", spec.name, proc.pid, command)
        return proc

    def info(self, name: str) -> dict[str, Any]:
        """supervisord's process info of ``name`` (``statename``, ``pid``, ``start``...)."""
        return dict(self._call("getProcessInfo", name))

    def all_info(self) -> dict[str, dict[str, Any]]:
        return {p["name"]: dict(p) for p in self._call("getAllProcessInfo")}

    def stop(self, name: str) -> None:
        """Stop ``name`` cleanly (its stop signal, SIGKILL after its stop timeout); it stays
        stopped."""
        try:
            self._call("stopProcess", name, True)
        except xmlrpc.client.Fault as exc:
            if "NOT_RUNNING" not in exc.faultString:
                raise

    def start_program(self, name: str) -> None:
        """Start a stopped program again."""
        self._call("startProcess", name, False)

    def signal(self, name: str, sig: signal.Signals) -> None:
        """Send ``sig`` to ``name`` as if from outside (SIGKILL: a crash, restarted)."""
        self._call("signalProcess", name, sig.name.removeprefix("SIG"))


class SupervisedProcess:
    """A program run by :class:`Supervisor`; the same surface as ``ManagedProcess``."""

    def __init__(self, supervisor: Supervisor, name: str, log_path: Path) -> None:
        self.supervisor = supervisor
        self.name = name
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """The current pid (a restart changes it); 0 while not running."""
        return int(self.supervisor.info(self.name)["pid"])

    def state(self) -> str:
        return str(self.supervisor.info(self.name)["statename"])

    def alive(self) -> bool:
        try:
            return self.state() in LIVE_STATES
        except (OSError, xmlrpc.client.Error):
            return False

    def stop(self, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Stop through the supervisor; the program's own stop signal and timeout apply."""
        self.supervisor.stop(self.name)

    def describe(self) -> str:
        return f"{self.name} ({self.state()}); log tail:\n{log_tail(self.log_path)}"
