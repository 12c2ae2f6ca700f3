"""Launch the tritonserver 2.51 binary shipped in the nvidia-pytriton wheel.

The wheel carries the server, its libraries (found through the binary's rpath), the python
backend and one backend stub per Python version. We assemble a backend directory holding the
python backend plus the stub for this interpreter (with its exec bit), and start Triton with
this environment's ``bin`` first on PATH: the stub takes ``sys.prefix`` - hence the packages
our models import - from the first ``python3`` on PATH.

Under the stack's supervisor the program is ``python -m rtinfer.triton_server ...``, which
reads the repository's ``serving.json`` files at each (re)start, so a Triton restarted after a
model swap loads the versions and pinned pipelines serving at that moment, then replaces
itself with ``tritonserver``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import stat
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gateway.repository.layout import served_models
from rtinfer.procs import Launch, Process, ProcessError, ProgramSpec, spawn_program, wait_until

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonPorts:
    host: str
    http: int
    grpc: int
    metrics: int

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc}"


def pytriton_server_dir() -> Path:
    import pytriton

    path = Path(pytriton.__file__).parent / "tritonserver"
    if not (path / "bin" / "tritonserver").exists():
        raise ProcessError(f"tritonserver binary not found under {path}")
    return path


def check_stub_python() -> None:
    """The stub links Debian's libpython3.11; a venv of another 3.11 build breaks ssl/redis."""
    if sys.version_info[:2] != (3, 11):
        raise ProcessError(f"python backend stub needs Python 3.11, running {sys.version}")
    if os.path.realpath(sys.base_prefix) != "/usr":
        log.warning(
            "this environment is not built from Debian's /usr/bin/python3.11 (base %s); "
            "python-backend models may fail to import ssl/redis",
            sys.base_prefix,
        )


def assemble_backend_dir(dest: Path) -> Path:
    """Copy the python backend and this interpreter's stub into ``dest/python``."""
    server = pytriton_server_dir()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        raise ProcessError(f"no python backend stub for Python {py} in {stub.parent.parent}")
    target = dest / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (
        server / "backends" / "python" / "libtriton_python.so",
        server / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        # copy beside, then rename: a stub still running from the old file keeps its inode
        # (overwriting a running executable in place fails with "Text file busy")
        tmp = target / f".{src.name}.tmp"
        shutil.copy2(src, tmp)
        if src is stub:
            tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        tmp.replace(target / src.name)
    return dest


def reap_orphan_stubs(backend_dir: Path) -> list[int]:
    """SIGKILL python-backend stubs of ``backend_dir`` whose Triton is gone (parent is init).

    A stub is meant to exit within 300 ms of its server's death, but one stuck on the
    shared-memory health mutex of a server that died lives on, holding its model's resources;
    every (re)start of the stack's Triton clears them. Returns the pids killed.
    """
    stub = str((backend_dir / "python" / "triton_python_backend_stub").resolve())
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if ppid == 1 and argv0 == stub:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    if killed:
        log.warning("killed %d orphaned python-backend stubs: %s", len(killed), killed)
    return killed


def triton_argv(
    repository: Path,
    backend_dir: Path,
    ports: TritonPorts,
    models: list[str],
    log_verbose: int = 0,
    exit_timeout_s: int = 10,
    latency_summaries: bool = False,
) -> list[str]:
    argv = [
        str(pytriton_server_dir() / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={backend_dir}",
        "--model-control-mode=explicit",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--disable-auto-complete-config",
        f"--http-address={ports.host}",
        f"--http-port={ports.http}",
        f"--grpc-address={ports.host}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-address={ports.host}",
        f"--metrics-port={ports.metrics}",
        "--allow-gpu-metrics=false",
        f"--log-verbose={log_verbose}",
        f"--exit-timeout-secs={exit_timeout_s}",
    ]
    if latency_summaries:
        # p50..p99.9 of queue and compute time per model on /metrics
        argv.append("--metrics-config=summary_latencies=true")
    argv += [f"--load-model={m}" for m in models]
    return argv


def triton_env(malloc: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if malloc is not None and malloc.is_file():
        env["LD_PRELOAD"] = os.pathsep.join(p for p in (str(malloc), env.get("LD_PRELOAD")) if p)
    elif malloc is not None:
        log.info("allocator %s not found: tritonserver runs on glibc malloc", malloc)
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # the server finds its libraries through its rpath; the stub (a separate binary) does not
    libs = pytriton_server_dir().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    env.pop("PYTHONHOME", None)
    return env


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def triton_program(
    repository: Path,
    state_dir: Path,
    ports: TritonPorts,
    *,
    log_verbose: int = 0,
    exit_timeout_s: int = 10,
    latency_summaries: bool = False,
    malloc: Path | None = None,
) -> ProgramSpec:
    """Triton serving what ``repository`` renders (re-read at every start)."""
    check_stub_python()
    backend_dir = assemble_backend_dir(state_dir / "triton_backends")
    argv = [
        sys.executable, "-m", "rtinfer.triton_server",
        "--repository", str(repository),
        "--backend-dir", str(backend_dir),
        "--host", ports.host,
        "--http-port", str(ports.http),
        "--grpc-port", str(ports.grpc),
        "--metrics-port", str(ports.metrics),
        "--log-verbose", str(log_verbose),
        "--exit-timeout-s", str(exit_timeout_s),
    ]  # fmt: skip
    if latency_summaries:
        argv.append("--latency-summaries")
    return ProgramSpec(
        "triton",
        argv,
        state_dir / "triton.log",
        env=triton_env(malloc),
        stop_timeout_s=exit_timeout_s + 10,
        start_secs=2.0,
        signal_group=False,  # tritonserver finalizes its stubs; SIGTERM to them races that
    )


def start_triton(
    repository: Path,
    state_dir: Path,
    ports: TritonPorts,
    models: list[str],
    startup_timeout_s: float = 180.0,
    log_verbose: int = 0,
    exit_timeout_s: int = 10,
    latency_summaries: bool = False,
    launch: Launch = spawn_program,
    malloc: Path | None = None,
) -> Process:
    """Start Triton serving ``models`` (explicit mode) and wait until each one is READY."""
    spec = triton_program(
        repository,
        state_dir,
        ports,
        log_verbose=log_verbose,
        exit_timeout_s=exit_timeout_s,
        latency_summaries=latency_summaries,
        malloc=malloc,
    )
    proc = launch(spec)
    try:
        wait_triton_ready(proc, ports, models, startup_timeout_s)
    except BaseException:
        proc.stop()
        raise
    return proc


def wait_triton_ready(
    proc: Process | None, ports: TritonPorts, models: list[str], timeout_s: float
) -> None:
    """Wait until Triton and each of ``models`` answer READY."""
    base = f"http://{ports.http_url}"
    wait_until(
        lambda: (
            http_ok(f"{base}/v2/health/ready")
            and all(http_ok(f"{base}/v2/models/{m}/ready") for m in models)
        ),
        timeout_s=timeout_s,
        proc=proc,
        what="Triton and all models READY",
        interval_s=0.25,
    )


def main(args: list[str] | None = None) -> None:
    """Replace this process with ``tritonserver`` loading what the repository serves now."""
    parser = argparse.ArgumentParser(prog="python -m rtinfer.triton_server")
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--backend-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--exit-timeout-s", type=int, default=10)
    parser.add_argument("--latency-summaries", action="store_true")
    ns = parser.parse_args(args)
    reap_orphan_stubs(ns.backend_dir)  # of a previous server that died
    ports = TritonPorts(ns.host, ns.http_port, ns.grpc_port, ns.metrics_port)
    argv = triton_argv(
        ns.repository,
        ns.backend_dir,
        ports,
        served_models(ns.repository),
        ns.log_verbose,
        ns.exit_timeout_s,
        ns.latency_summaries,
    )
    sys.stdout.flush()
    os.execve(argv[0], argv, os.environ)


if __name__ == "__main__":
    main()
