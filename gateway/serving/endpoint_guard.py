"""Fail fast on a Triton endpoint that is known to be broken.

Triton answers some failures only slowly: after ``kill -9`` of a python-backend stub, every
request to a pipeline using that model waits a second for the dead stub before Triton replies
``Stub process '...' is not healthy`` (INTERNAL), so with a 100 ms budget every caller would
wait out its deadline. The guard keeps, per serving endpoint:

* **open** once Triton answered an error that is not a timeout (upstream error, model not
  loaded, server unreachable): from then on :meth:`EndpointGuard.check` raises that error
  again at once (same type, so the same ``degraded_reason``) and the prediction service serves
  the fallback without calling Triton;
* **suspect** after ``suspect_after`` timeouts in a row with no success between them: calls
  still go out, and one background probe with a long timeout finds out why;

and while an endpoint is open or suspect, a background probe (one row through the pipeline,
never logged) runs every ``probe_interval_s``: a success closes it, a non-timeout error opens
it, a timeout ends suspicion (Triton is slow, not broken). Probes of a suspect endpoint wait
``probe_timeout_s`` (long enough for Triton's slow error); probes of an open one only
``recheck_timeout_s``, so the first one after the model came back closes it quickly. A closed
endpoint costs one dict lookup per call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.errors import DeadlineExceeded, GatewayError, UpstreamFailure
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

#: probes one endpoint; raises the mapped gateway error when Triton does not answer
Probe = Callable[[str, float], Awaitable[object]]


@dataclass
class EndpointState:
    open: bool = False
    suspect: bool = False
    consecutive_timeouts: int = 0
    #: the error that opened it (or the last one a probe saw)
    error: GatewayError | None = None
    opened_at: float | None = None
    probing: asyncio.Task[None] | None = None

    @property
    def last_error(self) -> str | None:
        return self.error.message if self.error is not None else None


class EndpointGuard:
    """Per-endpoint open/suspect state, fed by call outcomes, healed by background probes."""

    def __init__(
        self,
        probe: Probe,
        metrics: GatewayMetrics | None = None,
        *,
        probe_interval_s: float = 0.25,
        probe_timeout_s: float = 2.0,
        recheck_timeout_s: float = 0.5,
        suspect_after: int = 5,
    ) -> None:
        self._probe = probe
        self._metrics = metrics
        self._probe_interval_s = probe_interval_s
        self._probe_timeout_s = probe_timeout_s
        self._recheck_timeout_s = recheck_timeout_s
        self._suspect_after = suspect_after
        self._states: dict[str, EndpointState] = {}

    def state(self, endpoint: str) -> EndpointState:
        return self._states.get(endpoint) or EndpointState()

    def check(self, endpoint: str) -> None:
        """While ``endpoint`` is open, raise (a copy of) the error that opened it."""
        state = self._states.get(endpoint)
        if state is not None and state.open and state.error is not None:
            error = type(state.error)(
                f"{state.error.message} (failing fast until a probe of {endpoint} succeeds)"
            )
            error.failed_fast = True
            raise error

    def succeeded(self, endpoint: str) -> None:
        state = self._states.get(endpoint)
        if state is not None and (state.consecutive_timeouts or state.suspect):
            state.consecutive_timeouts = 0
            state.suspect = False

    def failed(self, endpoint: str, error: GatewayError) -> None:
        """Account a failed call (one per Triton call, whatever its rows)."""
        if isinstance(error, DeadlineExceeded):
            self.timed_out(endpoint)
        elif isinstance(error, UpstreamFailure) and not error.failed_fast:
            self._open(endpoint, error)

    def timed_out(self, endpoint: str) -> None:
        """A row gave up waiting for ``endpoint``."""
        state = self._states.setdefault(endpoint, EndpointState())
        state.consecutive_timeouts += 1
        if not state.open and state.consecutive_timeouts >= self._suspect_after:
            state.suspect = True
            self._start_probing(endpoint, state)

    async def close(self) -> None:
        tasks = [s.probing for s in self._states.values() if s.probing is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _open(self, endpoint: str, error: GatewayError) -> None:
        state = self._states.setdefault(endpoint, EndpointState())
        state.error = error
        if not state.open:
            state.open, state.opened_at = True, time.monotonic()
            log.warning("endpoint %s opened: %s", endpoint, error.message)
            self._gauge(endpoint, 1)
        self._start_probing(endpoint, state)

    def _start_probing(self, endpoint: str, state: EndpointState) -> None:
        if state.probing is None or state.probing.done():
            state.probing = asyncio.get_running_loop().create_task(
                self._probe_until_settled(endpoint, state), name=f"probe-{endpoint}"
            )

    async def _probe_until_settled(self, endpoint: str, state: EndpointState) -> None:
        while state.open or state.suspect:
            timeout_s = self._recheck_timeout_s if state.open else self._probe_timeout_s
            outcome = await self._probe_once(endpoint, timeout_s)
            if outcome == "ok":
                if state.open:
                    down_s = time.monotonic() - (state.opened_at or time.monotonic())
                    log.warning("endpoint %s closed after %.2fs", endpoint, down_s)
                    self._gauge(endpoint, 0)
                state.open = state.suspect = False
                state.consecutive_timeouts = 0
                return
            if outcome == "timeout" and not state.open:
                state.suspect, state.consecutive_timeouts = False, 0  # slow, not broken
                return
            await asyncio.sleep(self._probe_interval_s)

    async def _probe_once(self, endpoint: str, timeout_s: float) -> str:
        try:
            await self._probe(endpoint, timeout_s)
        except DeadlineExceeded:
            outcome = "timeout"
        except GatewayError as exc:
            state = self._states[endpoint]
            state.error = exc
            if not state.open:
                state.open, state.opened_at = True, time.monotonic()
                log.warning("endpoint %s opened by a probe: %s", endpoint, exc.message)
                self._gauge(endpoint, 1)
            outcome = "error"
        else:
            outcome = "ok"
        if self._metrics is not None:
            self._metrics.endpoint_probes.labels(endpoint, outcome).inc()
        return outcome

    def _gauge(self, endpoint: str, value: int) -> None:
        if self._metrics is not None:
            self._metrics.endpoint_open.labels(endpoint).set(value)
