"""``GET /predict/{model}/health``: what answers for a model, checked rather than guessed.

For each deployment: Triton's readiness and loaded versions, the scorer versions its pipeline
actually answers with (from the ensemble config and the loaded versions), a probe row through
the pipeline and whether the gateway is failing fast on it. For the model: a real PING of the
feature store and the last minute's counters summed over every gateway worker. Probes and the
PING are rate limited (one per ``ttl_s`` per endpoint, shared by concurrent callers), so
polling the endpoint costs Triton and Redis next to nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.catalog.records import Deployment
from gateway.catalog.snapshot import ModelEntry
from gateway.errors import GatewayError
from gateway.schemas import FeatureStoreHealth, ModelHealth, ProbeHealth, TritonModelHealth
from gateway.serving.health import HealthTracker, WindowStats
from gateway.serving.triton_client import ModelState, TritonClient

T = TypeVar("T")

#: steps of a pipeline that are not scoring models
NOT_SCORERS = ("feature_assembler",)
POSTPROCESS_MARK = "_postprocess"
#: above this share of degraded answers (with enough requests) a model is degraded
DEGRADED_SHARE = 0.5
MIN_REQUESTS = 10
TRAFFIC_ROLES = ("prod", "canary")


@dataclass
class _Cached(Generic[T]):
    """A value recomputed at most once per ``ttl_s``; concurrent callers share one refresh."""

    ttl_s: float
    value: T | None = None
    at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self, compute: Callable[[], Awaitable[T]]) -> tuple[T, float]:
        async with self.lock:
            now = time.monotonic()
            if self.value is None or now - self.at >= self.ttl_s:
                self.value, self.at = await compute(), time.monotonic()
            return self.value, time.monotonic() - self.at


@dataclass(frozen=True)
class _StoreCheck:
    ok: bool
    error: str | None
    latency_ms: float | None


class HealthChecks:
    """The rate-limited checks behind the per-model health of one gateway worker."""

    def __init__(
        self,
        triton: TritonClient,
        tracker: HealthTracker,
        feature_store_url: str,
        *,
        ttl_s: float = 2.0,
        timeout_s: float = 1.0,
    ) -> None:
        self.triton = triton
        self.tracker = tracker
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._redis = aioredis.Redis.from_url(
            feature_store_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._store = _Cached[_StoreCheck](ttl_s)
        self._probes: dict[str, _Cached[ProbeHealth]] = {}
        self._steps: dict[str, _Cached[list[tuple[str, int]]]] = {}

    async def close(self) -> None:
        await self._redis.aclose()

    async def model(self, entry: ModelEntry) -> ModelHealth:
        endpoints = sorted({d.serving_endpoint for d in entry.deployments})
        triton_error: str | None = None
        states: list[ModelState] = []
        ready: dict[str, bool] = dict.fromkeys(endpoints, False)
        try:
            states = await self.triton.model_states(self._timeout_s)
            flags = await asyncio.gather(
                *(self.triton.is_model_ready(e, self._timeout_s) for e in endpoints)
            )
            ready = dict(zip(endpoints, flags, strict=True))
        except GatewayError as exc:
            triton_error = exc.message
        deployments = [
            await self._deployment(entry, d, ready, states, triton_error is None)
            for d in entry.deployments
        ]
        stats = self.tracker.stats(entry.name)
        store, store_age = await self._store.get(self._ping)
        feature_store = FeatureStoreHealth(
            status="ok" if store.ok else "unavailable",
            error=store.error,
            latency_ms=store.latency_ms,
            age_s=round(store_age, 3),
            degraded_rate_1m=stats.feature_store_degraded_rate,
        )
        status, reasons = _verdict(triton_error, deployments, feature_store, stats)
        return ModelHealth(
            model_name=entry.name,
            status=status,
            reasons=reasons,
            triton_reachable=triton_error is None,
            triton_error=triton_error,
            deployments=deployments,
            feature_store=feature_store,
            requests_1m=stats.requests,
            degraded_rate_1m=stats.degraded_rate,
            last_inference_latency_ms=stats.last_inference_latency_ms,
            gateway_workers=stats.workers,
        )

    async def _deployment(
        self,
        entry: ModelEntry,
        d: Deployment,
        ready: dict[str, bool],
        states: list[ModelState],
        reachable: bool,
    ) -> TritonModelHealth:
        endpoint = d.serving_endpoint
        role = entry.routing.role(d)
        loaded = _loaded(states)
        mine = [s for s in states if s.name == endpoint]
        probe: ProbeHealth | None = None
        scorers: dict[str, str] = {}
        if reachable and role in TRAFFIC_ROLES:
            probe = await self._probe(endpoint)
            scorers = await self._scorer_versions(endpoint, loaded)
        return TritonModelHealth(
            deployment_id=d.deployment_id,
            serving_endpoint=endpoint,
            role=role,
            ready=ready[endpoint],
            loaded_versions=loaded.get(endpoint, []),
            scorer_versions=scorers,
            state=mine[0].state if mine else None,
            reason=next((s.reason for s in mine if s.reason), None),
            probe=probe,
            failing_fast=self.triton.guard.state(endpoint).open,
        )

    async def _probe(self, endpoint: str) -> ProbeHealth:
        cached = self._probes.setdefault(endpoint, _Cached[ProbeHealth](self._ttl_s))

        async def run() -> ProbeHealth:
            started = time.perf_counter()
            try:
                result = await self.triton.probe(endpoint, self._timeout_s)
            except GatewayError as exc:
                return ProbeHealth(ok=False, error=exc.message, age_s=0.0)
            return ProbeHealth(
                ok=True,
                degraded=result.degraded,
                degraded_reason=result.degraded_reason or None,
                latency_ms=round((time.perf_counter() - started) * 1e3, 3),
                age_s=0.0,
            )

        probe, age = await cached.get(run)
        return probe.model_copy(update={"age_s": round(age, 3)})

    async def _scorer_versions(self, endpoint: str, loaded: dict[str, list[str]]) -> dict[str, str]:
        cached = self._steps.setdefault(endpoint, _Cached[list[tuple[str, int]]](self._ttl_s))
        try:
            steps, _ = await cached.get(
                lambda: self.triton.ensemble_steps(endpoint, self._timeout_s)
            )
        except GatewayError:
            return {}
        out: dict[str, str] = {}
        for model, version in steps:
            if model in NOT_SCORERS or POSTPROCESS_MARK in model:
                continue
            if version > 0:
                out[model] = str(version)
            elif loaded.get(model):
                out[model] = max(loaded[model], key=int)
        return out

    async def _ping(self) -> _StoreCheck:
        started = time.perf_counter()
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            return _StoreCheck(False, f"{type(exc).__name__}: {exc}", None)
        return _StoreCheck(True, None, round((time.perf_counter() - started) * 1e3, 3))


def _loaded(states: list[ModelState]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in states:
        if s.state == "READY" and s.version:
            out.setdefault(s.name, []).append(s.version)
    return out


def _verdict(
    triton_error: str | None,
    deployments: list[TritonModelHealth],
    feature_store: FeatureStoreHealth,
    stats: WindowStats,
) -> tuple[str, list[str]]:
    arms = [d for d in deployments if d.role in TRAFFIC_ROLES]
    if triton_error is not None:
        return "down", [f"triton unreachable: {triton_error}"]
    down: list[str] = []
    if not any(d.ready for d in arms):
        down.append("no traffic arm is READY in Triton")
    elif not any(d.probe is not None and d.probe.ok for d in arms):
        down.append("no traffic arm answers its probe")
    if down:
        return "down", down
    reasons = []
    for d in arms:
        where = f"{d.role} {d.serving_endpoint}"
        if not d.ready:
            reasons.append(f"{where} is not READY")
        if d.probe is not None and not d.probe.ok:
            reasons.append(f"{where} probe failed: {d.probe.error}")
        elif d.probe is not None and d.probe.degraded:
            reasons.append(f"{where} answers degraded: {d.probe.degraded_reason}")
        if d.failing_fast:
            reasons.append(f"{where} is failing fast to the fallback")
    if feature_store.status != "ok":
        reasons.append(f"feature store unavailable: {feature_store.error}")
    rate = stats.degraded_rate
    if rate is not None and stats.requests >= MIN_REQUESTS and rate > DEGRADED_SHARE:
        reasons.append(f"{rate:.0%} of the last minute's {stats.requests} answers were degraded")
    return ("degraded" if reasons else "ok"), reasons
