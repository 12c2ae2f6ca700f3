from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import redis

from python_backend.breaker import BreakerState, CircuitBreaker
from python_backend.feature_spec import FeatureDef, FeatureSpec
from python_backend.features.assembler import (
    AssemblyError,
    AssemblyInput,
    AssemblyOutput,
    FeatureAssembler,
    online_fields,
)
from python_backend.features.cache import EntityCache
from python_backend.features.store import RedisFeatureStore

# Spec order interleaves the groups so that the layout, not the grouping, is tested:
# user 0-9, merchant 0-9, context 0-4, user 10-19, merchant 10-19, context 5-9.
USER = [FeatureDef(name=f"u{i}", group="user", default=1.0, min=0.0, max=100.0) for i in range(20)]
MERCHANT = [
    FeatureDef(name=f"m{i}", group="merchant", default=0.0, min=-10.0, max=10.0) for i in range(20)
]
CONTEXT = [
    FeatureDef(name=f"c{i}", group="context", default=0.5, min=0.0, max=1.0) for i in range(10)
]
SPEC = FeatureSpec(
    features=USER[:10] + MERCHANT[:10] + CONTEXT[:5] + USER[10:] + MERCHANT[10:] + CONTEXT[5:]
)
USER_POS = [SPEC.names.index(f.name) for f in USER]
MERCHANT_POS = [SPEC.names.index(f.name) for f in MERCHANT]
CONTEXT_POS = [SPEC.names.index(f.name) for f in CONTEXT]


class FakePipeline:
    def __init__(self, client: "FakeRedis") -> None:
        self.client = client
        self.commands: list[tuple[str, list[str]]] = []

    def __enter__(self) -> "FakePipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.commands = []

    def hmget(self, key: str, fields: list[str]) -> None:
        self.commands.append((key, list(fields)))

    def execute(self, raise_on_error: bool = True) -> list[list[bytes | None]]:
        self.client.executed.append(list(self.commands))
        if self.client.error is not None:
            raise self.client.error
        return [
            [self.client.hashes.get(key, {}).get(field) for field in fields]
            for key, fields in self.commands
        ]


class FakeRedis:
    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, bytes]] = {}
        self.error: Exception | None = None
        self.executed: list[list[tuple[str, list[str]]]] = []

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        assert transaction is False
        return FakePipeline(self)

    def hmget_keys(self) -> list[str]:
        return [key for commands in self.executed for key, _ in commands]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    assembler: FeatureAssembler
    redis: FakeRedis
    clock: FakeClock
    breaker: CircuitBreaker

    def add_user(self, user_id: str, values: dict[str, bytes] | None = None) -> None:
        self.redis.hashes[f"features:user:{user_id}"] = values or user_hash()

    def add_merchant(self, merchant_id: str, values: dict[str, bytes] | None = None) -> None:
        self.redis.hashes[f"features:merchant:{merchant_id}"] = values or merchant_hash()


def user_hash(base: float = 10.0) -> dict[str, bytes]:
    return {f"u{i}": str(base + i).encode() for i in range(20)}


def merchant_hash(base: float = -5.0) -> dict[str, bytes]:
    return {f"m{i}": str(base + i * 0.5).encode() for i in range(20)}


def request(users: list[bytes], merchants: list[bytes], context: Any = None) -> AssemblyInput:
    if context is None:
        context = np.full((len(users), 10), 0.25, dtype=np.float32)
    return AssemblyInput(user_ids=users, merchant_ids=merchants, context=context)


@pytest.fixture
def h() -> Harness:
    clock = FakeClock()
    fake = FakeRedis()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=1.0, clock=clock)
    assembler = FeatureAssembler(
        SPEC,
        store=RedisFeatureStore(fake, online_fields(SPEC)),
        cache=EntityCache(max_entities=100, ttl_s=5.0, timer=clock),
        breaker=breaker,
        clock=clock,
    )
    return Harness(assembler, fake, clock, breaker)


def ok(result: AssemblyOutput | AssemblyError) -> AssemblyOutput:
    assert isinstance(result, AssemblyOutput), result
    return result


def test_vector_is_laid_out_in_spec_order(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    context = np.linspace(0.0, 0.9, 10, dtype=np.float32).reshape(1, 10)
    (out,) = h.assembler.assemble([request([b"u1"], [b"m1"], context)])
    out = ok(out)
    assert out.features.shape == (1, 50)
    assert out.features.dtype == np.float32
    np.testing.assert_allclose(out.features[0, USER_POS], 10.0 + np.arange(20))
    np.testing.assert_allclose(out.features[0, MERCHANT_POS], -5.0 + 0.5 * np.arange(20))
    np.testing.assert_allclose(out.features[0, CONTEXT_POS], context[0])
    assert out.imputed_count.tolist() == [0]
    assert out.imputed_count.dtype == np.int32
    assert out.feature_store_ok.tolist() == [True]


def test_ids_are_stripped_before_lookup(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    out = ok(h.assembler.assemble([request([b" u1\n"], [b"m1 "])])[0])
    assert out.imputed_count.tolist() == [0]


def test_duplicate_entities_are_fetched_once_in_one_round_trip(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    h.add_merchant("m2")
    results = h.assembler.assemble(
        [
            request([b"u1", b"u1"], [b"m1", b"m1"]),
            request([b"u1"], [b"m2"]),
        ]
    )
    assert len(h.redis.executed) == 1
    assert sorted(h.redis.hmget_keys()) == [
        "features:merchant:m1",
        "features:merchant:m2",
        "features:user:u1",
    ]
    first, second = ok(results[0]), ok(results[1])
    assert first.features.shape == (2, 50)
    assert second.features.shape == (1, 50)
    np.testing.assert_array_equal(first.features[0], first.features[1])
    np.testing.assert_array_equal(second.features[0, USER_POS], first.features[0, USER_POS])
    stats = h.assembler.stats()
    assert (stats.requests, stats.rows, stats.store_round_trips) == (2, 3, 1)


def test_cached_entities_skip_the_store(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    first = ok(h.assembler.assemble([request([b"u1"], [b"m1"])])[0])
    h.redis.hashes.clear()  # a cache hit must not depend on Redis any more
    second = ok(h.assembler.assemble([request([b"u1"], [b"m1"])])[0])
    assert len(h.redis.executed) == 1
    np.testing.assert_array_equal(first.features, second.features)
    stats = h.assembler.stats()
    assert (stats.cache_hits, stats.cache_misses) == (2, 2)


def test_only_cache_misses_are_fetched(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    h.add_merchant("m2")
    h.assembler.assemble([request([b"u1"], [b"m1"])])
    h.assembler.assemble([request([b"u1"], [b"m2"])])
    assert h.redis.executed[1] == [("features:merchant:m2", [f"m{i}" for i in range(20)])]


def test_cache_entries_expire_after_ttl(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    h.assembler.assemble([request([b"u1"], [b"m1"])])
    h.clock.now += 5.0
    h.add_user("u1", user_hash(base=50.0))
    out = ok(h.assembler.assemble([request([b"u1"], [b"m1"])])[0])
    assert len(h.redis.executed) == 2
    assert out.features[0, USER_POS[0]] == 50.0


def test_missing_entity_gets_defaults_and_is_cached(h: Harness) -> None:
    h.add_merchant("m1")
    out = ok(h.assembler.assemble([request([b"ghost"], [b"m1"])])[0])
    np.testing.assert_array_equal(out.features[0, USER_POS], np.ones(20, dtype=np.float32))
    assert out.imputed_count.tolist() == [20]
    assert out.feature_store_ok.tolist() == [True]
    h.assembler.assemble([request([b"ghost"], [b"m1"])])
    assert len(h.redis.executed) == 1
    stats = h.assembler.stats()
    assert stats.entities_not_found == 2
    assert stats.imputed == {"user": 40, "merchant": 0, "context": 0}


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"null",
        b"None",
        b"nan",
        b"NaN",
        b"inf",
        b"-inf",
        b"abc",
        b"1e400",
        b"100.5",
        b"-1",
    ],
)
def test_unusable_value_is_replaced_by_the_default(h: Harness, raw: bytes | None) -> None:
    values = user_hash()
    if raw is None:
        del values["u3"]
    else:
        values["u3"] = raw
    h.add_user("u1", values)
    h.add_merchant("m1")
    out = ok(h.assembler.assemble([request([b"u1"], [b"m1"])])[0])
    assert out.features[0, USER_POS[3]] == 1.0
    assert out.features[0, USER_POS[4]] == 14.0
    assert out.imputed_count.tolist() == [1]
    assert h.assembler.stats().imputed["user"] == 1


def test_range_bounds_are_inclusive(h: Harness) -> None:
    h.add_user("u1", {**user_hash(), "u0": b"0", "u1": b"100"})
    h.add_merchant("m1", {**merchant_hash(), "m0": b"-10", "m1": b" 10 "})
    out = ok(h.assembler.assemble([request([b"u1"], [b"m1"])])[0])
    assert out.features[0, USER_POS[:2]].tolist() == [0.0, 100.0]
    assert out.features[0, MERCHANT_POS[:2]].tolist() == [-10.0, 10.0]
    assert out.imputed_count.tolist() == [0]


def test_invalid_context_values_are_replaced_by_defaults(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    context = np.full((2, 10), 0.25, dtype=np.float32)
    context[0, 0] = np.nan
    context[0, 9] = np.inf
    context[1, 4] = 1.5
    context[1, 5] = -0.1
    out = ok(h.assembler.assemble([request([b"u1", b"u1"], [b"m1", b"m1"], context)])[0])
    assert out.features[0, CONTEXT_POS[0]] == 0.5
    assert out.features[0, CONTEXT_POS[9]] == 0.5
    assert out.features[1, CONTEXT_POS[4]] == 0.5
    assert out.features[1, CONTEXT_POS[5]] == 0.5
    assert out.features[1, CONTEXT_POS[6]] == 0.25
    assert out.imputed_count.tolist() == [2, 2]
    assert h.assembler.stats().imputed["context"] == 4


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (request([b""], [b"m1"]), "user_id[0] is empty"),
        (request([b"u1", b"  "], [b"m1", b"m1"]), "user_id[1] is empty"),
        (
            request([b"u1", b"u1", b"u1"], [b"m1", b"m1", b"\xff\xfe"]),
            "merchant_id[2] is not valid UTF-8",
        ),
        (request([b"u" * 129], [b"m1"]), "user_id[0] is 129 bytes long"),
        (request(["u1"], [b"m1"]), "user_id[0] must be bytes"),  # type: ignore[list-item]
        (request([b"u1", b"u2"], [b"m1"], np.zeros((2, 10), np.float32)), "row counts differ"),
        (request([b"u1"], [b"m1"], np.zeros((2, 10), np.float32)), "row counts differ"),
        (
            request([b"u1"], [b"m1"], np.zeros((1, 9), np.float32)),
            "context must have shape [rows, 10]",
        ),
        (request([], [], np.zeros((0, 10), np.float32)), "no rows"),
    ],
)
def test_bad_request_fails_alone(h: Harness, bad: AssemblyInput, message: str) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    good = request([b"u1"], [b"m1"])
    results = h.assembler.assemble([good, bad, good])
    assert isinstance(results[1], AssemblyError)
    assert message in results[1].message
    assert ok(results[0]).imputed_count.tolist() == [0]
    assert ok(results[2]).imputed_count.tolist() == [0]
    stats = h.assembler.stats()
    assert (stats.requests, stats.invalid_requests, stats.rows) == (3, 1, 2)


def test_ids_of_128_bytes_are_accepted(h: Harness) -> None:
    out = ok(h.assembler.assemble([request([b"u" * 128], ["é".encode() * 64])])[0])
    assert h.redis.hmget_keys() == [f"features:user:{'u' * 128}", f"features:merchant:{'é' * 64}"]
    assert out.imputed_count.tolist() == [40]


def test_all_requests_invalid_means_no_store_call(h: Harness) -> None:
    results = h.assembler.assemble([request([b""], [b"m1"])])
    assert isinstance(results[0], AssemblyError)
    assert h.redis.executed == []


def test_store_failure_serves_defaults_flagged_not_ok(h: Harness) -> None:
    h.redis.error = redis.ConnectionError("connection refused")
    out = ok(h.assembler.assemble([request([b"u1", b"u2"], [b"m1", b"m1"])])[0])
    np.testing.assert_array_equal(out.features[:, USER_POS], np.ones((2, 20), np.float32))
    np.testing.assert_array_equal(out.features[:, MERCHANT_POS], np.zeros((2, 20), np.float32))
    np.testing.assert_array_equal(out.features[:, CONTEXT_POS], np.full((2, 10), 0.25, np.float32))
    assert out.feature_store_ok.tolist() == [False, False]
    assert out.imputed_count.tolist() == [40, 40]
    stats = h.assembler.stats()
    assert (stats.store_errors, stats.entities_not_found) == (1, 0)


def test_failed_fetches_are_not_cached(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    h.redis.error = redis.TimeoutError("timeout")
    h.assembler.assemble([request([b"u1"], [b"m1"])])
    h.redis.error = None
    out = ok(h.assembler.assemble([request([b"u1"], [b"m1"])])[0])
    assert len(h.redis.executed) == 2
    assert out.feature_store_ok.tolist() == [True]
    assert out.imputed_count.tolist() == [0]


def test_rows_served_from_cache_stay_ok_while_the_store_is_down(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    h.assembler.assemble([request([b"u1"], [b"m1"])])
    h.redis.error = redis.ConnectionError("down")
    out = ok(h.assembler.assemble([request([b"u1", b"u1"], [b"m1", b"m2"])])[0])
    # row 0 is fully cached; row 1 needs m2, which the store could not serve
    assert out.feature_store_ok.tolist() == [True, False]
    assert out.imputed_count.tolist() == [0, 20]
    np.testing.assert_allclose(out.features[1, USER_POS], 10.0 + np.arange(20))


def test_breaker_opens_then_skips_the_store_then_recovers(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    h.redis.error = redis.ConnectionError("down")
    for _ in range(3):
        h.assembler.assemble([request([b"u1"], [b"m1"])])
    assert h.breaker.state is BreakerState.OPEN
    assert len(h.redis.executed) == 3

    for _ in range(5):
        out = ok(h.assembler.assemble([request([b"u1"], [b"m1"])])[0])
        assert out.feature_store_ok.tolist() == [False]
        assert out.imputed_count.tolist() == [40]
    assert len(h.redis.executed) == 3
    assert h.assembler.stats().breaker_short_circuits == 5

    # half-open trial fails: one store call, open again
    h.clock.now += 1.0
    h.assembler.assemble([request([b"u1"], [b"m1"])])
    assert len(h.redis.executed) == 4
    assert h.breaker.state is BreakerState.OPEN
    h.assembler.assemble([request([b"u1"], [b"m1"])])
    assert len(h.redis.executed) == 4

    # half-open trial succeeds: closed, real features again
    h.redis.error = None
    h.clock.now += 1.0
    out = ok(h.assembler.assemble([request([b"u1"], [b"m1"])])[0])
    assert len(h.redis.executed) == 5
    assert h.breaker.state is BreakerState.CLOSED
    assert out.feature_store_ok.tolist() == [True]
    assert out.imputed_count.tolist() == [0]
    stats = h.assembler.stats()
    assert (stats.store_round_trips, stats.store_errors) == (5, 4)


def test_fetch_duration_is_recorded(h: Harness) -> None:
    h.add_user("u1")
    h.add_merchant("m1")
    clock = h.clock
    original = h.redis.pipeline

    def slow_pipeline(transaction: bool = True) -> FakePipeline:
        clock.now += 0.004
        return original(transaction)

    h.redis.pipeline = slow_pipeline  # type: ignore[method-assign]
    h.assembler.assemble([request([b"u1"], [b"m1"])])
    assert h.assembler.stats().last_fetch_seconds == pytest.approx(0.004)


def test_empty_batch(h: Harness) -> None:
    assert h.assembler.assemble([]) == []
    assert h.redis.executed == []


def test_store_fields_must_match_the_spec() -> None:
    fields = online_fields(SPEC)
    fields["user"] = list(reversed(fields["user"]))
    with pytest.raises(ValueError, match="do not match"):
        FeatureAssembler(
            SPEC,
            store=RedisFeatureStore(FakeRedis(), fields),
            cache=EntityCache(),
            breaker=CircuitBreaker(),
        )


def test_stats_are_a_snapshot(h: Harness) -> None:
    before = h.assembler.stats()
    h.assembler.assemble([request([b"u1"], [b"m1"])])
    assert before.requests == 0
    assert before.imputed["user"] == 0
    assert h.assembler.stats().imputed["user"] == 20
