"""Who used the CPU during a benchmark step, and where a Python process spends its samples.

``CpuMeter`` reads ``/proc``: CPU seconds of named process trees (Triton with its stubs, the
gateway with its workers, Kafka, Redis, PostgreSQL), of this script's waited children (the
load generator) and of the whole machine, so whatever is left is other people's load on the
shared box. ``summarize_profile`` folds ``py-spy record --format raw`` stacks into the
gateway's stages.
"""

from __future__ import annotations

import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, CPU seconds) of one process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            table[int(entry)] = st
    return table


def descendants(root: int, table: dict[int, tuple[int, float]]) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """Cores used per process group between ``start`` and ``stop``.

    ``groups`` maps a name to the root pid of a process tree. ``loadgen`` is the CPU of this
    script's children that exited in the window (vegeta, perf_analyzer, py-spy); ``other`` is
    the machine's busy time nobody above accounts for (other users of the box).
    """

    groups: dict[str, int]
    _t0: float = 0.0
    _busy0: float = 0.0
    _children0: float = 0.0
    _cpu0: dict[int, float] = field(default_factory=dict)
    _members: dict[str, set[int]] = field(default_factory=dict)

    def start(self) -> None:
        table = process_table()
        self._members = {name: descendants(pid, table) for name, pid in self.groups.items()}
        self._cpu0 = {pid: cpu for pid, (_, cpu) in table.items()}
        self._busy0, self._children0 = machine_busy_s(), children_cpu_s()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        busy, children = machine_busy_s(), children_cpu_s()
        table = process_table()
        out: dict[str, float] = {}
        for name, root in self.groups.items():
            members = self._members[name] | descendants(root, table)
            used = sum(table[pid][1] - self._cpu0.get(pid, 0.0) for pid in members if pid in table)
            out[name] = used / wall
        out["loadgen"] = (children - self._children0) / wall
        out["busy"] = (busy - self._busy0) / wall
        out["other"] = max(0.0, out["busy"] - sum(out[n] for n in (*self.groups, "loadgen")))
        out["wall_s"] = wall
        return {k: round(v, 3) for k, v in out.items()}


#: (stage, substrings of a frame). A sample goes to the first of these stages with a frame
#: anywhere on its stack (e.g. Redis socket writes under the rate limiter count as auth) ...
SPECIFIC_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prediction log (Kafka produce, delivery callbacks)", ("python_backend/predlog/",)),
    ("JSON log lines", ("logging/__init__.py", "gateway/logs.py", "json/encoder.py")),
    ("Prometheus metrics", ("prometheus_client/",)),
    (
        "auth + rate limit (Redis)",
        ("gateway/auth/security.py", "gateway/auth/keys.py", "ratelimit.py"),
    ),
    ("Triton gRPC client", ("tritonclient/", "grpc/")),
    ("request/response models (pydantic)", ("pydantic",)),
    (
        "prediction service",
        ("gateway/serving/service.py", "gateway/catalog/traffic.py", "gateway/http/"),
    ),
)
#: ... else to the framework stage of its innermost frame that matches one.
FRAMEWORK_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "FastAPI/Starlette routing and middleware",
        ("fastapi/", "starlette/", "gateway/http/ingress"),
    ),
    ("uvicorn HTTP protocol (httptools)", ("uvicorn/protocols/",)),
    ("asyncio/uvloop loop and sockets", ("asyncio/", "uvicorn/")),
)


def _stage(frames: list[str]) -> str:
    for stage, keys in SPECIFIC_STAGES:
        if any(k in frame for frame in frames for k in keys):
            return stage
    for frame in reversed(frames):
        for stage, keys in FRAMEWORK_STAGES:
            if any(k in frame for k in keys):
                return stage
    return "other"


def summarize_profile(paths: list[Path], rate_hz: int, duration_s: float) -> dict[str, object]:
    """Stage shares and top self frames of ``py-spy record --format raw`` files."""
    by_stage: Counter[str] = Counter()
    by_self: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            by_self[frames[-1]] += n
            threads["main" if "Runner.run" in stack else "other threads"] += n
            by_stage[_stage(frames)] += n
    if not total:
        return {"samples": 0}

    def share(counter: Counter[str], n: int | None = None) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in counter.most_common(n)]

    return {
        "samples": total,
        # py-spy skips idle threads: samples / possible samples ~ busy share of one core
        "busy_cores": round(total / (rate_hz * duration_s), 2),
        "stages_pct": share(by_stage),
        "threads_pct": share(threads),
        "top_self_pct": share(by_self, 15),
    }
