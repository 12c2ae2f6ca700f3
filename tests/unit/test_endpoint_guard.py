"""The endpoint guard: fail fast after a non-timeout error, probe until Triton answers."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import DeadlineExceeded, GatewayError, UpstreamError
from gateway.metrics import GatewayMetrics
from gateway.serving.endpoint_guard import EndpointGuard


class ScriptedProbe:
    """Answers probes from a script: an exception to raise, or None for a success."""

    def __init__(self, *outcomes: GatewayError | None) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self, endpoint: str, timeout_s: float) -> object:
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        return object()


def _guard(probe: ScriptedProbe, metrics: GatewayMetrics | None = None) -> EndpointGuard:
    return EndpointGuard(probe, metrics, probe_interval_s=0.01, suspect_after=3)


async def _settled(guard: EndpointGuard, endpoint: str) -> None:
    task = guard.state(endpoint).probing
    if task is not None:
        await asyncio.wait_for(task, 5)


def test_a_non_timeout_error_fails_fast_until_a_probe_succeeds() -> None:
    async def run() -> None:
        stub_dead = UpstreamError("Stub process 'feature_assembler_0_0' is not healthy.")
        probe = ScriptedProbe(stub_dead, stub_dead, None)
        metrics = GatewayMetrics()
        guard = _guard(probe, metrics)
        guard.check("p")  # closed: nothing raised
        guard.failed("p", stub_dead)
        with pytest.raises(UpstreamError, match=r"not healthy.*failing fast") as raised:
            guard.check("p")
        assert raised.value.failed_fast and raised.value.reason == "triton_error"
        guard.failed("p", raised.value)  # a fast failure does not count as a new one
        assert guard.state("p").open
        await _settled(guard, "p")
        assert probe.calls == 3  # two failed probes, then the stub was back
        guard.check("p")
        assert not guard.state("p").open
        text = metrics.render().decode()
        assert 'rtinfer_gateway_endpoint_probes_total{endpoint="p",outcome="error"} 2.0' in text
        assert 'rtinfer_gateway_endpoint_open{endpoint="p"} 0.0' in text
        await guard.close()

    asyncio.run(run())


def test_timeouts_make_an_endpoint_suspect_and_a_probe_tells_slow_from_broken() -> None:
    async def run() -> None:
        # slow: the probe times out as well -> suspicion ends, calls keep going out
        slow = ScriptedProbe(DeadlineExceeded("slow"))
        guard = _guard(slow)
        for _ in range(3):
            guard.timed_out("p")
        assert guard.state("p").suspect
        await _settled(guard, "p")
        assert not guard.state("p").open and not guard.state("p").suspect
        guard.check("p")

        # broken: Triton's slow answer to the long probe is an error -> open
        broken = ScriptedProbe(UpstreamError("not healthy"), None)
        guard = _guard(broken)
        for _ in range(3):
            guard.timed_out("p")
        await asyncio.sleep(0.005)
        with pytest.raises(UpstreamError):
            guard.check("p")
        await _settled(guard, "p")
        guard.check("p")
        await guard.close()

    asyncio.run(run())


def test_successes_reset_the_timeout_count_and_other_endpoints_are_unaffected() -> None:
    async def run() -> None:
        probe = ScriptedProbe()
        guard = _guard(probe)
        for _ in range(2):
            guard.timed_out("p")
        guard.succeeded("p")
        guard.timed_out("p")
        assert not guard.state("p").suspect and probe.calls == 0
        guard.failed("q", UpstreamError("boom"))
        guard.check("p")
        guard.failed("p", DeadlineExceeded("late"))  # a timeout never opens
        guard.check("p")
        await guard.close()

    asyncio.run(run())
