"""Launch the tritonserver 2.51 binary shipped in the nvidia-pytriton wheel.

The wheel carries the server, its libraries (found through the binary's rpath), the python
backend and one backend stub per Python version. We assemble a backend directory holding the
python backend plus the stub for this interpreter (with its exec bit), and start Triton with
this environment's ``bin`` first on PATH: the stub takes ``sys.prefix`` - hence the packages
our models import - from the first ``python3`` on PATH.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rtinfer.procs import ManagedProcess, ProcessError, spawn, wait_until

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
        shutil.copy2(src, target / src.name)
    stub_copy = target / stub.name
    stub_copy.chmod(stub_copy.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return dest


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


def triton_env() -> dict[str, str]:
    env = dict(os.environ)
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


def start_triton(
    repository: Path,
    state_dir: Path,
    ports: TritonPorts,
    models: list[str],
    startup_timeout_s: float = 180.0,
    log_verbose: int = 0,
    exit_timeout_s: int = 10,
    latency_summaries: bool = False,
) -> ManagedProcess:
    """Start Triton serving ``models`` (explicit mode) and wait until each one is READY."""
    check_stub_python()
    backend_dir = assemble_backend_dir(state_dir / "triton_backends")
    argv = triton_argv(
        repository, backend_dir, ports, models, log_verbose, exit_timeout_s, latency_summaries
    )
    proc = spawn("triton", argv, state_dir / "triton.log", env=triton_env())
    base = f"http://{ports.http_url}"
    try:
        wait_until(
            lambda: (
                http_ok(f"{base}/v2/health/ready")
                and all(http_ok(f"{base}/v2/models/{m}/ready") for m in models)
            ),
            timeout_s=startup_timeout_s,
            proc=proc,
            what="Triton and all models READY",
            interval_s=0.25,
        )
    except BaseException:
        proc.stop()
        raise
    return proc
