"""The sink's batching, commit order, dead letters and retries (plain fakes for Kafka and the
store; the real ones are exercised in tests/integration/test_prediction_store.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson

from gateway.store.backend import StoreError
from gateway.store.config import StoreSettings
from gateway.store.sink import DLQ_REASON, PredictionSink
from gateway.store.sink_metrics import SinkMetrics


class Msg:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        self._t, self._p, self._o, self._v = topic, partition, offset, value

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes:
        return self._v

    def key(self) -> bytes:
        return b"k"

    def error(self) -> None:
        return None


class Consumer:
    def __init__(self, batches: list[list[Msg]]) -> None:
        self.batches = batches
        self.commits: list[dict[tuple[str, int], int]] = []
        self.events: list[str] = []
        self.paused = 0

    def consume(self, num_messages: int, timeout: float) -> list[Msg]:
        return self.batches.pop(0)[:num_messages] if self.batches else []

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        assert asynchronous is False
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets})
        self.events.append("commit")

    def assignment(self) -> list[Any]:
        return []

    def pause(self, _: Any) -> None:
        self.paused += 1

    def resume(self, _: Any) -> None:
        pass

    def poll(self, _: float) -> None:
        return None


class Store:
    database = "test"

    def __init__(self, events: list[str], failures: list[StoreError] | None = None) -> None:
        self.events, self.failures = events, failures or []
        self.inserted: dict[str, list[dict[str, Any]]] = {}

    def insert_json(self, table: str, lines: bytes) -> None:
        if self.failures:
            raise self.failures.pop(0)
        rows = [orjson.loads(line) for line in lines.splitlines()]
        if any(r.get("request_id") == "refused" for r in rows):
            raise StoreError("Code: 27. cannot parse", transient=False)
        self.inserted.setdefault(table, []).extend(rows)
        self.events.append(f"insert {table} {len(rows)}")


class Producer:
    def __init__(self, events: list[str]) -> None:
        self.events, self.sent = events, []

    def produce(
        self, topic: str, value: bytes, key: bytes, headers: dict, on_delivery: Any
    ) -> None:
        self.sent.append((topic, value, headers))

    def flush(self, _: float) -> int:
        self.events.append(f"dlq {len(self.sent)}")
        return 0


def record(rid: str) -> bytes:
    return orjson.dumps(
        {
            "request_id": rid,
            "timestamp": 1_796_000_000.0,
            "model_name": "m",
            "arm": "prod",
            "prediction": 0.5,
        }
    )


def label(rid: str) -> bytes:
    return orjson.dumps(
        {
            "request_id": rid,
            "source": "s",
            "label": "fraud",
            "label_value": 1,
            "observed_at": 1_796_000_000.0,
            "received_at": 1_796_000_000.0,
        }
    )


def make(batches: list[list[Msg]], failures: list[StoreError] | None = None, **cfg: Any) -> Any:
    consumer = Consumer(batches)
    store = Store(consumer.events, failures)
    producer = Producer(consumer.events)
    settings = StoreSettings(batch_max_ms=50, insert_retry_max_s=0.2, **cfg)
    sink = PredictionSink(consumer, store, producer, settings, SinkMetrics())  # type: ignore[arg-type]
    return sink, consumer, store, producer


def drain(sink: PredictionSink) -> None:
    stop = threading.Event()
    batch = sink.collect(stop)
    sink.store(batch, stop)


def test_a_batch_is_inserted_per_table_then_committed() -> None:
    msgs = [
        Msg("predictions", 0, 10, record("a")),
        Msg("predictions", 1, 5, record("b")),
        Msg("prediction-labels", 0, 7, label("a")),
        Msg("predictions", 0, 11, record("c")),
    ]
    sink, consumer, _, _ = make([msgs])
    drain(sink)
    assert consumer.events == ["insert predictions 3", "insert prediction_labels 1", "commit"]
    assert consumer.commits == [
        {("predictions", 0): 12, ("predictions", 1): 6, ("prediction-labels", 0): 8}
    ]


def test_batches_are_bounded_in_rows() -> None:
    msgs = [Msg("predictions", 0, i, record(str(i))) for i in range(5)]
    sink, consumer, _, _ = make([msgs[:3], msgs[3:]], batch_max_rows=3)
    drain(sink)
    assert consumer.commits == [{("predictions", 0): 3}]


def test_poison_is_dead_lettered_before_the_commit_and_the_rest_stored() -> None:
    msgs = [Msg("predictions", 0, 1, b"{bad"), Msg("predictions", 0, 2, record("ok"))]
    sink, consumer, _, producer = make([msgs])
    drain(sink)
    assert consumer.events == ["insert predictions 1", "dlq 1", "commit"]
    ((topic, value, headers),) = producer.sent
    assert topic == "predictions-dlq" and value == b"{bad"
    assert headers[DLQ_REASON] == b"invalid_json"
    assert consumer.commits == [{("predictions", 0): 3}]


def test_rows_the_store_refuses_are_dead_lettered_one_by_one() -> None:
    msgs = [Msg("predictions", 0, i, record(rid)) for i, rid in enumerate(["a", "refused", "b"])]
    sink, consumer, store, producer = make([msgs])
    drain(sink)
    assert [r["request_id"] for r in store.inserted["predictions"]] == ["a", "b"]
    assert [h[DLQ_REASON] for _, _, h in producer.sent] == [b"store_refused"]
    assert consumer.events[-1] == "commit"


def test_an_unreachable_store_is_retried_without_committing_or_double_inserting() -> None:
    down = StoreError("connection refused", transient=True)
    msgs = [Msg("predictions", 0, 1, record("a")), Msg("prediction-labels", 0, 1, label("a"))]
    sink, consumer, _, _ = make([msgs], failures=[down, down])
    drain(sink)
    assert consumer.paused == 2  # the partitions waited, paused, twice
    assert consumer.events == ["insert predictions 1", "insert prediction_labels 1", "commit"]


def test_a_table_stored_before_a_failure_is_not_inserted_again() -> None:
    msgs = [Msg("predictions", 0, 1, record("a")), Msg("prediction-labels", 0, 1, label("a"))]
    sink, _, store, _ = make([msgs])
    real = store.insert_json
    calls = {"n": 0}

    def flaky(table: str, lines: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise StoreError("timeout", transient=True)
        real(table, lines)

    store.insert_json = flaky  # type: ignore[method-assign]
    drain(sink)
    assert len(store.inserted["predictions"]) == 1 and len(store.inserted["prediction_labels"]) == 1


def test_run_overlaps_batches_and_commits_them_in_order() -> None:
    batches = [[Msg("predictions", 0, i, record(str(i)))] for i in range(3)]
    sink, consumer, store, _ = make(batches, batch_max_rows=1)
    stop = threading.Event()
    consume = consumer.consume

    def consume_then_stop(num_messages: int, timeout: float) -> list[Msg]:
        if not consumer.batches:
            stop.set()
        return consume(num_messages, timeout)

    consumer.consume = consume_then_stop  # type: ignore[method-assign]
    sink.run(stop)
    assert [c[("predictions", 0)] for c in consumer.commits] == [1, 2, 3]
    assert len(store.inserted["predictions"]) == 3


def test_an_idle_partition_still_gets_the_last_batch_committed() -> None:
    sink, consumer, _, _ = make([[Msg("predictions", 0, 4, record("last"))]])
    stop = threading.Event()
    commits_seen: list[int] = []  # commits made before each idle poll
    consume = consumer.consume

    def idle_after(num_messages: int, timeout: float) -> list[Msg]:
        if not consumer.batches:
            commits_seen.append(len(consumer.commits))
            if len(commits_seen) > 3:
                stop.set()
            time.sleep(timeout)  # as a real consume with nothing to return
        return consume(num_messages, timeout)

    consumer.consume = idle_after  # type: ignore[method-assign]
    sink.run(stop)
    assert consumer.commits == [{("predictions", 0): 5}]
    # committed while nothing else arrived, before the stop was asked for
    assert commits_seen[-1] == 1


def test_a_stop_during_an_outage_leaves_the_batch_uncommitted() -> None:
    down = StoreError("connection refused", transient=True)
    sink, consumer, _, _ = make([[Msg("predictions", 0, 1, record("a"))]], failures=[down] * 99)
    stop = threading.Event()
    batch = sink.collect(stop)
    stop.set()
    sink.store(batch, stop)
    assert consumer.commits == []


def test_run_returns_once_stopped() -> None:
    sink, consumer, _, _ = make([])
    stop = threading.Event()
    stop.set()
    sink.run(stop)
    assert consumer.commits == []
