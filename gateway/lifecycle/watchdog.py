"""The model watchdog: probe what Triton serves, reload a model whose stub process died.

Triton 2.51 does not restart a python-backend stub that was killed (an OOM kill, a crash in
native code): the server and the model keep reporting READY while every request to the model,
or to an ensemble using it, fails after a second with ``Stub process '<model>_0_0' is not
healthy``. Loading the model again through the repository API starts a new stub - but only
for version directories whose modification time is newer than when they were loaded (Triton
skips a version it considers unmodified), so the watchdog first bumps the mtime of each of
the model's version directories, then loads it; the ensembles need no reload.

Every ``watchdog_interval_s`` the watchdog sends one probe row through every loaded ensemble,
and through every loaded non-ensemble model that no ensemble uses (the BLS fallback model),
all at once. A probe failing with that error names the dead stub; the watchdog then loads
that model (never unloading anything) and records the event three ways: a warning log line,
``rtinfer_watchdog_reloads_total{model,outcome}`` and a ``stub_restarted`` row in the catalog
history of every catalog model served through an affected endpoint (``GET /models/{m}``). A
model reloaded less than ``cooldown_s`` ago is not reloaded again (a stub dying in a loop
backs off instead of reloading continuously).

It does not act on slow or refused probes: those are load, or what the gateway's own guard
and fallbacks handle. On Kubernetes the same probes run per Triton pod as a liveness check:
``python -m gateway.lifecycle.watchdog --url localhost:8001`` runs one round and exits 1 when
a stub is dead, so the kubelet restarts the pod (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from psycopg_pool import AsyncConnectionPool

from gateway.catalog import swaps
from gateway.lifecycle.errors import LifecycleError
from gateway.lifecycle.triton_repo import READY, TritonRepository
from python_backend.contract import CONTEXT_FEATURES

log = logging.getLogger(__name__)

#: Triton's message for a request that reached a dead stub
DEAD_STUB = re.compile(r"Stub process '(?P<instance>[^']+)' is not healthy")
#: an instance name is <model>_<instance group>_<instance>
_INSTANCE = re.compile(r"^(?P<model>.+)_\d+_\d+$")
PROBE_ENTITY = "__rtinfer_watchdog__"
HISTORY_ACTION = "stub_restarted"


def touch_versions(repository: Path, model: str) -> list[int]:
    """Make every version directory of ``model`` newer than its last load; return them."""
    versions = []
    model_dir = repository / model
    if model_dir.is_dir():
        for child in model_dir.iterdir():
            if child.is_dir() and child.name.isdigit():
                os.utime(child)
                versions.append(int(child.name))
    return sorted(versions)


def dead_model(message: str) -> str | None:
    """The model whose stub a Triton error says is dead, if it says so."""
    match = DEAD_STUB.search(message)
    if match is None:
        return None
    instance = match["instance"]
    named = _INSTANCE.fullmatch(instance)
    return named["model"] if named else instance


@dataclass
class WatchdogMetrics:
    registry: CollectorRegistry
    probes: Counter = field(init=False)
    reloads: Counter = field(init=False)
    recovery: Histogram = field(init=False)
    failing: Gauge = field(init=False)

    def __post_init__(self) -> None:
        self.probes = Counter(
            "rtinfer_watchdog_probes",
            "Watchdog probes by outcome (ok, dead_stub, error).",
            ["outcome"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "rtinfer_watchdog_reloads",
            "Models the watchdog loaded again after their stub died, by model and outcome.",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.recovery = Histogram(
            "rtinfer_watchdog_reload_seconds",
            "Time of one reload of a model with a dead stub.",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.failing = Gauge(
            "rtinfer_watchdog_failing_probes",
            "Probes of the last round that failed.",
            registry=self.registry,
        )


@dataclass(frozen=True)
class Target:
    """One probe: an ensemble (the pipeline row) or a model without an ensemble using it."""

    model: str
    ensemble: bool


class ModelWatchdog:
    """Periodic probes of Triton's models; reloads the model of a dead stub."""

    def __init__(
        self,
        triton: TritonRepository,
        pool: AsyncConnectionPool | None,
        registry: CollectorRegistry,
        repository: Path,
        *,
        interval_s: float = 1.0,
        probe_timeout_s: float = 3.0,
        cooldown_s: float = 5.0,
    ) -> None:
        self._triton = triton
        self._pool = pool
        self._repository = repository
        self.metrics = WatchdogMetrics(registry)
        self._interval_s = interval_s
        self._probe_timeout_s = probe_timeout_s
        self._cooldown_s = cooldown_s
        self._reloaded_at: dict[str, float] = {}
        self._uses: dict[str, frozenset[str]] = {}  # ensemble -> models of its steps
        self._task: asyncio.Task[None] | None = None
        #: every reload done: (model, endpoints, seconds)
        self.reloads: list[tuple[str, tuple[str, ...], float]] = []

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="model-watchdog")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except LifecycleError as exc:  # Triton down or restarting: nothing to heal here
                log.debug("watchdog round skipped: %s", exc.message)
            except Exception:
                log.exception("watchdog round failed")
            await asyncio.sleep(max(0.0, self._interval_s - (time.monotonic() - started)))

    async def tick(self) -> list[str]:
        """One round: probe everything, reload what a dead stub broke; return reloaded."""
        reloaded = []
        for model, endpoints in (await self.find_dead()).items():
            if await self._reload(model, endpoints):
                reloaded.append(model)
        return reloaded

    async def find_dead(self) -> dict[str, list[str]]:
        """Probe every target at once; model of a dead stub -> the targets that showed it."""
        targets = await self.targets()
        outcomes = await asyncio.gather(*(self._probe(t) for t in targets))
        dead: dict[str, list[str]] = {}
        failing = 0
        for target, message in zip(targets, outcomes, strict=True):
            if message is None:
                self.metrics.probes.labels("ok").inc()
                continue
            failing += 1
            model = dead_model(message)
            self.metrics.probes.labels("dead_stub" if model else "error").inc()
            if model is not None:
                dead.setdefault(model, []).append(target.model)
        self.metrics.failing.set(failing)
        return dead

    async def targets(self) -> list[Target]:
        """Loaded ensembles, plus loaded models no ensemble uses."""
        index = await self._triton.index()
        loaded = sorted({s.model for s in index if s.state == READY})
        ensembles: list[str] = []
        for name in loaded:
            if name not in self._uses:
                config = await self._triton.config(name)
                steps = config.ensemble_scheduling.step if config.platform == "ensemble" else []
                self._uses[name] = frozenset(step.model_name for step in steps)
            if self._uses[name]:
                ensembles.append(name)
        used = set().union(*(self._uses[e] for e in ensembles)) if ensembles else set()
        return [Target(e, True) for e in ensembles] + [
            Target(m, False) for m in loaded if m not in used and not self._uses[m]
        ]

    async def _probe(self, target: Target) -> str | None:
        """None when the target answered; Triton's error message otherwise."""
        try:
            if target.ensemble:
                context = np.full((1, len(CONTEXT_FEATURES)), np.nan, dtype=np.float32)
                await asyncio.wait_for(
                    self._triton.infer_pipeline(
                        target.model, [PROBE_ENTITY], [PROBE_ENTITY], context
                    ),
                    self._probe_timeout_s,
                )
            else:
                await self._triton.probe(target.model, None, self._probe_timeout_s)
        except LifecycleError as exc:
            return exc.message
        except asyncio.TimeoutError:
            return f"{target.model}: no answer within {self._probe_timeout_s:g}s"
        return None

    async def _reload(self, model: str, endpoints: list[str]) -> bool:
        last = self._reloaded_at.get(model)
        if last is not None and time.monotonic() - last < self._cooldown_s:
            return False
        self._reloaded_at[model] = time.monotonic()
        started = time.perf_counter()
        try:
            touched = await asyncio.to_thread(touch_versions, self._repository, model)
            if not touched:
                raise LifecycleError(f"no version directory of {model} in {self._repository}")
            await self._triton.load(model)
        except LifecycleError as exc:
            self.metrics.reloads.labels(model, "failed").inc()
            log.error("watchdog: reloading %s (dead stub) failed: %s", model, exc.message)
            return False
        seconds = time.perf_counter() - started
        self.metrics.reloads.labels(model, "ok").inc()
        self.metrics.recovery.observe(seconds)
        self.reloads.append((model, tuple(endpoints), seconds))
        log.warning(
            "watchdog: the stub of %s had died (seen through %s); reloaded it in %.2fs",
            model,
            ", ".join(sorted(endpoints)),
            seconds,
        )
        await self._record(model, endpoints, seconds)
        return True

    async def _record(self, model: str, endpoints: list[str], seconds: float) -> None:
        """A history row for every catalog model served through an affected endpoint."""
        if self._pool is None:
            return
        detail = {"triton_model": model, "endpoints": sorted(endpoints), "reload_s": seconds}
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT DISTINCT model_name FROM model_deployments "
                    "WHERE is_active AND serving_endpoint = ANY(%s) ORDER BY 1",
                    (sorted(endpoints),),
                )
                names = [str(r[0]) for r in await cur.fetchall()] or [model]
                for name in names:
                    await swaps.record(conn, name, HISTORY_ACTION, detail)
        except Exception as exc:  # the reload is done; the record is best effort
            log.warning("watchdog: recording the reload of %s failed: %s", model, exc)


async def check(url: str, timeout_s: float) -> dict[str, list[str]]:
    """One round of probes against Triton at ``url``, reloading nothing."""
    triton = TritonRepository(url)
    try:
        watchdog = ModelWatchdog(
            triton, None, CollectorRegistry(), Path("."), probe_timeout_s=timeout_s
        )
        return await watchdog.find_dead()
    finally:
        await triton.close()


def main(argv: list[str] | None = None) -> int:
    """Liveness check: exit 1 when a python-backend stub of Triton at ``--url`` is dead."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gateway.lifecycle.watchdog")
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC host:port")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="per probe")
    ns = parser.parse_args(argv)
    try:
        dead = asyncio.run(check(ns.url, ns.timeout_s))
    except LifecycleError as exc:
        print(f"triton not reachable: {exc.message}")
        return 1
    for model, seen_through in sorted(dead.items()):
        print(f"dead stub: {model} (seen through {', '.join(sorted(seen_through))})")
    return 1 if dead else 0


if __name__ == "__main__":
    raise SystemExit(main())
