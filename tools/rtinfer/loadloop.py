"""A closed-loop prediction load that records every answer: status, served version, latency.

Used to watch a model swap from the client's side (tests and ``perf_analyzer/swap_bench.py``):
``concurrency`` workers each send one ``POST /predict/{model}`` after the other, with user ids
drawn from a fixed population so the canary split (sticky per user) can be measured too.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Sample:
    started: float
    finished: float
    status: int
    #: the ``model_version`` of the answer ("" when there is none)
    version: str
    degraded_reason: str
    user: str

    @property
    def latency_ms(self) -> float:
        return (self.finished - self.started) * 1e3


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@dataclass
class LoadLoop:
    client: httpx.AsyncClient
    model: str
    concurrency: int = 4
    users: int = 1000
    samples: list[Sample] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> LoadLoop:
        ids = itertools.count()
        self._tasks = [
            asyncio.create_task(self._worker(ids), name=f"load-{i}")
            for i in range(self.concurrency)
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _worker(self, ids: itertools.count[int]) -> None:
        while not self._stop.is_set():
            n = next(ids)
            user = f"u_{n % self.users:06d}"
            body = {
                "entity_ids": {"user_id": user, "merchant_id": f"m_{n % 97:05d}"},
                "context": {"amount": 42.0 + n % 100, "hour_of_day": n % 24},
            }
            started = time.monotonic()
            try:
                r = await self.client.post(f"/predict/{self.model}", json=body)
                status = r.status_code
                data = r.json() if status == 200 else {}
            except httpx.HTTPError:
                status, data = 0, {}
            self.samples.append(
                Sample(
                    started,
                    time.monotonic(),
                    status,
                    str(data.get("model_version", "")),
                    str(data.get("degraded_reason") or ""),
                    user,
                )
            )

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.started < end]


@dataclass(frozen=True)
class Summary:
    requests: int
    non_2xx: int
    degraded: int
    p50_ms: float
    p99_ms: float
    per_s: float
    versions: dict[str, int]

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Summary:
        latencies = [s.latency_ms for s in samples]
        span = max(s.finished for s in samples) - min(s.started for s in samples) if samples else 0
        return cls(
            requests=len(samples),
            non_2xx=sum(1 for s in samples if not 200 <= s.status < 300),
            degraded=sum(1 for s in samples if s.degraded_reason),
            p50_ms=round(statistics.median(latencies), 2) if latencies else 0.0,
            p99_ms=round(percentile(latencies, 0.99), 2),
            per_s=round(len(samples) / span, 1) if span > 0 else 0.0,
            versions=dict(Counter(s.version for s in samples)),
        )


def first_answer(samples: Sequence[Sample], version: str) -> Sample | None:
    """The earliest finished answer served by ``version``."""
    served = [s for s in samples if s.version == version]
    return min(served, key=lambda s: s.finished) if served else None


def flips_back(samples: Sequence[Sample], old: str, new: str) -> list[Sample]:
    """Answers from ``old`` to requests sent after ``new`` had already answered one."""
    first = first_answer(samples, new)
    if first is None:
        return []
    return [s for s in samples if s.version == old and s.started > first.finished]
