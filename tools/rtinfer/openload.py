"""An open-loop prediction load at a fixed rate that records every answer, for fault drills.

Unlike :mod:`rtinfer.loadloop` (closed loop: each worker waits for its answer), requests go
out on a fixed schedule whatever happens to the answers, as real callers keep arriving
during an outage. Each request carries its own request id, so what the caller saw can be
matched against the prediction log afterwards. :meth:`OpenLoad.recovery_after` measures how
long answers stayed bad (no answer, non-2xx, or degraded) after a fault was injected.

It runs on aiohttp: at 100 requests/s httpx costs the client 6-9 ms of CPU per request on a
2-core box, aiohttp 1.4-1.9 ms, and a client that falls behind its schedule measures itself.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True)
class Answer:
    sent: float
    finished: float
    request_id: str
    #: HTTP status; 0 when no HTTP answer came (connection refused or reset)
    status: int
    degraded_reason: str
    error: str = ""

    @property
    def good(self) -> bool:
        """A real (not degraded) 2xx prediction."""
        return 200 <= self.status < 300 and not self.degraded_reason


@dataclass
class OpenLoad:
    """``rate_per_s`` POST /predict/{model} per second until the context exits."""

    session: aiohttp.ClientSession
    model: str
    rate_per_s: float = 100.0
    prefix: str = "load-"
    users: int = 20_000
    answers: list[Answer] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OpenLoad:
        self._ticker = asyncio.create_task(self._tick(), name=f"open-load-{self.prefix}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._ticker is not None
        self._ticker.cancel()
        await asyncio.gather(self._ticker, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _tick(self) -> None:
        interval = 1.0 / self.rate_per_s
        start = time.monotonic()
        for n in itertools.count():
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one(n))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one(self, n: int) -> None:
        request_id = f"{self.prefix}{n:07d}"
        body = {
            "entity_ids": {"user_id": f"u_{n % self.users:06d}", "merchant_id": f"m_{n % 97:05d}"},
            "context": {"amount": 40.0 + n % 200, "hour_of_day": n % 24},
            "request_id": request_id,
        }
        sent = time.monotonic()
        status, reason, error = 0, "", ""
        try:
            async with self.session.post(f"/predict/{self.model}", json=body) as r:
                status = r.status
                if status == 200:
                    reason = str((await r.json()).get("degraded_reason") or "")
                else:
                    reason = await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.answers.append(Answer(sent, time.monotonic(), request_id, status, reason, error))

    def since(self, t: float) -> list[Answer]:
        return [a for a in self.answers if a.sent >= t]

    async def recovery_after(
        self, fault_at: float, quiet_s: float, timeout_s: float, good_share: float = 0.95
    ) -> float:
        """Seconds from ``fault_at`` until answers are good again: the start of the first
        ``quiet_s`` window (of requests sent after the fault) with no answer missing or
        non-2xx and at least ``good_share`` of them real predictions (stray deadline misses
        of a busy box are not the fault's). Raises TimeoutError after ``timeout_s``."""
        deadline = fault_at + timeout_s
        while True:
            found = recovered_at(self.answers, fault_at, quiet_s, good_share)
            if found is not None:
                return found - fault_at
            if time.monotonic() > deadline:
                answered = [a for a in self.answers if a.sent >= fault_at]
                raise TimeoutError(
                    f"answers still bad {timeout_s:g}s after the fault: {summary(answered)}"
                )
            await asyncio.sleep(0.1)


def recovered_at(
    answers: list[Answer], since: float, quiet_s: float, good_share: float
) -> float | None:
    """Send time of the first good answer opening a ``quiet_s`` window of good answers."""
    ordered = sorted((a for a in answers if a.sent >= since), key=lambda a: a.sent)
    end = 0
    for i, first in enumerate(ordered):
        if not first.good:
            continue
        end = max(end, i)
        while end < len(ordered) and ordered[end].sent < first.sent + quiet_s:
            end += 1
        if end == len(ordered):
            return None  # the window is not over yet
        window = ordered[i:end]
        if all(200 <= a.status < 300 for a in window) and (
            sum(a.good for a in window) >= good_share * len(window)
        ):
            return first.sent
    return None


def summary(answers: list[Answer]) -> dict[str, int]:
    """Counts by outcome: ``ok``, ``degraded:<reason>``, ``http_<status>``, ``no_answer``."""
    counts: Counter[str] = Counter()
    for a in answers:
        if a.status == 0:
            counts["no_answer"] += 1
        elif not 200 <= a.status < 300:
            counts[f"http_{a.status}"] += 1
        elif a.degraded_reason:
            counts[f"degraded:{a.degraded_reason}"] += 1
        else:
            counts["ok"] += 1
    return dict(counts)
