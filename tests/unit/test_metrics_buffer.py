"""Metric buffering of the python-backend shells."""

from __future__ import annotations

import random
import statistics

import pytest

from python_backend.metrics import CounterBuffer, Reservoir


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_counters_accumulate_until_the_interval_elapses() -> None:
    clock = FakeClock()
    buf = CounterBuffer(interval_s=1.0, clock=clock)
    buf.add("rows", 3)
    buf.add("rows", 4)
    buf.add("errors", 0)  # zero deltas are not recorded
    clock.now += 0.5
    assert not buf.due()
    clock.now += 0.5
    assert buf.due()
    assert buf.drain() == {"rows": 7}
    assert not buf.due()
    assert buf.drain() == {}


def test_zero_interval_is_always_due() -> None:
    buf = CounterBuffer(interval_s=0.0, clock=FakeClock())
    assert buf.due()


def test_negative_interval_rejected() -> None:
    with pytest.raises(ValueError):
        CounterBuffer(interval_s=-1)


def test_reservoir_keeps_everything_below_its_size() -> None:
    r = Reservoir(size=8)
    for v in range(5):
        r.add(float(v))
    assert r.seen == 5
    assert sorted(r.drain()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert r.drain() == [] and r.seen == 0


def test_reservoir_sample_is_bounded_and_uniform() -> None:
    means = []
    for seed in range(200):
        r = Reservoir(size=16, rng=random.Random(seed))
        for v in range(1000):
            r.add(float(v))
        sample = r.drain()
        assert len(sample) == 16
        assert len(set(sample)) == 16
        means.append(statistics.fmean(sample))
    # a sample biased to early or late values would move this far from 499.5
    assert statistics.fmean(means) == pytest.approx(499.5, abs=25)
