import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from python_backend.features.store import (
    FeatureStoreUnavailable,
    RedisFeatureStore,
    redis_client_from_url,
)

FIELDS = {"user": ["u_a", "u_b"], "merchant": ["m_a"]}


class FakePipeline:
    def __init__(self, client: "FakeRedis", transaction: bool) -> None:
        self.client = client
        self.transaction = transaction
        self.commands: list[tuple[str, list[str]]] = []

    def __enter__(self) -> "FakePipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.commands = []

    def hmget(self, key: str, fields: list[str]) -> None:
        self.commands.append((key, list(fields)))

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.client.executed.append(list(self.commands))
        if self.client.error is not None:
            raise self.client.error
        replies: list[Any] = []
        for key, fields in self.commands:
            stored = self.client.hashes.get(key)
            if isinstance(stored, Exception):
                replies.append(stored)
            else:
                replies.append([(stored or {}).get(f) for f in fields])
        return replies


class FakeRedis:
    """Records every pipeline and answers HMGET from a dict of hashes."""

    def __init__(self, hashes: dict[str, Any] | None = None) -> None:
        self.hashes = hashes or {}
        self.error: Exception | None = None
        self.executed: list[list[tuple[str, list[str]]]] = []
        self.pipelines: list[FakePipeline] = []

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        pipe = FakePipeline(self, transaction)
        self.pipelines.append(pipe)
        return pipe


def test_one_non_transactional_pipeline_with_one_hmget_per_distinct_key() -> None:
    client = FakeRedis({"features:user:1": {"u_a": b"1.5", "u_b": b"2"}})
    store = RedisFeatureStore(client, FIELDS)
    values = store.fetch(
        [
            ("user", "features:user:1"),
            ("merchant", "features:merchant:9"),
            ("user", "features:user:1"),
        ]
    )
    assert [p.transaction for p in client.pipelines] == [False]
    assert client.executed == [
        [("features:user:1", ["u_a", "u_b"]), ("features:merchant:9", ["m_a"])]
    ]
    assert values == {"features:user:1": [b"1.5", b"2"], "features:merchant:9": [None]}
    assert store.round_trips == 1


def test_missing_fields_come_back_as_none() -> None:
    client = FakeRedis({"features:user:1": {"u_b": b"3"}})
    store = RedisFeatureStore(client, FIELDS)
    assert store.fetch([("user", "features:user:1")]) == {"features:user:1": [None, b"3"]}


def test_no_lookups_no_round_trip() -> None:
    client = FakeRedis()
    store = RedisFeatureStore(client, FIELDS)
    assert store.fetch([]) == {}
    assert client.executed == []
    assert store.round_trips == 0


@pytest.mark.parametrize(
    "error",
    [redis.ConnectionError("refused"), redis.TimeoutError("timed out"), redis.RedisError("x")],
)
def test_redis_errors_become_feature_store_unavailable(error: Exception) -> None:
    client = FakeRedis()
    client.error = error
    store = RedisFeatureStore(client, FIELDS)
    with pytest.raises(FeatureStoreUnavailable, match=type(error).__name__):
        store.fetch([("user", "features:user:1")])
    assert store.round_trips == 1


def test_a_broken_key_does_not_fail_the_batch() -> None:
    client = FakeRedis(
        {
            "features:user:1": redis.ResponseError("WRONGTYPE"),
            "features:user:2": {"u_a": b"1", "u_b": b"2"},
        }
    )
    store = RedisFeatureStore(client, FIELDS)
    values = store.fetch([("user", "features:user:1"), ("user", "features:user:2")])
    assert values == {"features:user:1": [None, None], "features:user:2": [b"1", b"2"]}
    assert store.key_errors == 1


def test_unknown_group_is_rejected() -> None:
    store = RedisFeatureStore(FakeRedis(), FIELDS)
    with pytest.raises(ValueError, match="context"):
        store.fetch([("context", "features:context:1")])


def test_client_factory_sets_explicit_timeouts_and_no_retries() -> None:
    client = redis_client_from_url("redis://127.0.0.1:6399/0", timeout_ms=25)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == pytest.approx(0.025)
    assert kwargs["socket_connect_timeout"] == pytest.approx(0.025)
    assert kwargs["health_check_interval"] == 0
    assert kwargs["retry"].get_retries() == 0
    client.close()


@pytest.fixture
def silent_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.05)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_unresponsive_redis_costs_one_timeout(
    silent_server: tuple[int, list[socket.socket]],
) -> None:
    port, accepted = silent_server
    client = redis_client_from_url(f"redis://127.0.0.1:{port}/0", timeout_ms=100)
    store = RedisFeatureStore(client, FIELDS)
    start = time.perf_counter()
    with pytest.raises(FeatureStoreUnavailable, match="Timeout"):
        store.fetch([("user", "features:user:1")])
    elapsed = time.perf_counter() - start
    client.close()
    assert 0.09 <= elapsed < 0.3
    assert len(accepted) == 1


def test_refused_connection_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = redis_client_from_url(f"redis://127.0.0.1:{port}/0", timeout_ms=100)
    with pytest.raises(FeatureStoreUnavailable, match="ConnectionError"):
        RedisFeatureStore(client, FIELDS).fetch([("user", "features:user:1")])
    client.close()
