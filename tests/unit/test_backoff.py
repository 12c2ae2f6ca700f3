"""Capped exponential backoff with full jitter."""

from __future__ import annotations

import random

import pytest

from gateway.asyncpred.backoff import Backoff


def test_ceiling_doubles_up_to_the_cap() -> None:
    b = Backoff(0.5, 4.0)
    assert [b.ceiling(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.ceiling(10_000) == 4.0  # no overflow for absurd attempt numbers


def test_delays_are_jittered_within_the_ceiling() -> None:
    b = Backoff(1.0, 30.0, rng=random.Random(7))
    delays = [b.delay(3) for _ in range(2000)]
    assert all(0.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 1900  # spread, not lock-step
    assert 1.8 < sum(delays) / len(delays) < 2.2  # uniform over [0, 4]


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(1.0, 2.0).ceiling(0)
