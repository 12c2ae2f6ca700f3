"""The prediction sink: Kafka (predictions, shadow records, labels) into the store.

A sink consumes batches bounded in rows (``batch_max_rows``) and time (``batch_max_ms``),
inserts each table's rows in one statement, and commits the batch's offsets only after the
inserts returned (a ClickHouse insert is durable once acknowledged). A crash anywhere before
the commit redelivers the batch; the copies collapse in the ReplacingMergeTree tables. A
message that cannot be stored (:class:`~gateway.store.rows.PoisonRecord`, or rows the store
refuses) goes to the dead-letter topic with its reason before the commit, and never stalls
its partition. While the store is unreachable the sink pauses its partitions and retries the
same batch with backoff, staying in its consumer group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from gateway.asyncpred.backoff import Backoff
from gateway.store.backend import Store, StoreError
from gateway.store.config import StoreSettings
from gateway.store.rows import PoisonRecord, encode_rows, label_row, prediction_row
from gateway.store.sink_metrics import SinkMetrics

log = logging.getLogger(__name__)

PREDICTIONS_TABLE = "predictions"
LABELS_TABLE = "prediction_labels"
#: headers of a dead-lettered message
DLQ_REASON = "rtinfer-dlq-reason"
DLQ_DETAIL = "rtinfer-dlq-detail"
DLQ_SOURCE = "rtinfer-dlq-source"
#: how long an idle consume waits before handing back an empty batch
IDLE_POLL_S = 0.2


@dataclass
class Batch:
    """One batch's rows per table, dead letters, and the offsets to commit after it."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dead: list[tuple[Message, str, str]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    size: int = 0


class PredictionSink:
    def __init__(
        self,
        consumer: Consumer,
        store: Store,
        dead_letters: Producer,
        cfg: StoreSettings,
        metrics: SinkMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._store = store
        self._dlq = dead_letters
        self._cfg = cfg
        self._metrics = metrics
        self._clock = clock
        self._backoff = Backoff(0.2, cfg.insert_retry_max_s)
        #: messages a poll returned while the sink waited to retry: the next batch's
        self._pending: list[Message] = []

    def run(self, stop: threading.Event) -> None:
        """Consume and store until ``stop`` is set; the batches in hand are finished first.

        The next batch is consumed and parsed while the previous one is inserted (on a helper
        thread); batches are committed in order, each once its insert returned.
        """
        with ThreadPoolExecutor(1, thread_name_prefix="sink-insert") as inserter:
            in_flight: tuple[Batch, Future[None]] | None = None
            while not stop.is_set():
                batch = self.collect(stop)
                if in_flight is not None:
                    self._finish(*in_flight, stop)
                    in_flight = None
                if batch.size:
                    self._metrics.batch_rows.observe(batch.size)
                    in_flight = (batch, inserter.submit(self._insert_all, batch))
            if in_flight is not None:
                self._finish(*in_flight, stop)

    def _finish(self, batch: Batch, inserted: Future[None], stop: threading.Event) -> None:
        """Wait for ``batch``'s insert; retry what failed (:meth:`store`), then commit."""
        try:
            inserted.result()
        except (StoreError, KafkaException) as exc:
            log.warning("storing a batch failed, retrying: %s", exc)
            self._metrics.insert_failures.labels("transient").inc()
            if not self._retry(batch, stop, attempt=1):
                return
        self._commit(batch)

    def collect(self, stop: threading.Event) -> Batch:
        """Messages until ``batch_max_rows`` or ``batch_max_ms`` after the first one; an
        empty batch after ``IDLE_POLL_S`` without any (so the batch in flight gets committed
        while no traffic comes)."""
        batch, first = Batch(), None
        for msg in self._pending:
            first = self._clock() if first is None else first
            self._add(batch, msg)
        self._pending = []
        while batch.size < self._cfg.batch_max_rows and not stop.is_set():
            if first is None:
                wait = IDLE_POLL_S
            else:
                wait = first + self._cfg.batch_max_ms / 1000 - self._clock()
                if wait <= 0:
                    break
            wanted = self._cfg.batch_max_rows - batch.size
            consumed = self._consumer.consume(num_messages=wanted, timeout=wait)
            if not consumed and first is None:
                break
            for msg in consumed:
                if msg.error() is not None:
                    log.warning("kafka consumer: %s", msg.error())
                    continue
                first = self._clock() if first is None else first
                self._add(batch, msg)
        return batch

    def _add(self, batch: Batch, msg: Message) -> None:
        topic, value = msg.topic(), msg.value() or b""
        batch.size += 1
        batch.offsets[(topic, msg.partition())] = msg.offset() + 1
        try:
            if topic == self._cfg.labels_topic:
                table, row = LABELS_TABLE, label_row(value)
            else:
                table = PREDICTIONS_TABLE
                row = prediction_row(value, topic, msg.partition(), msg.offset())
        except PoisonRecord as exc:
            batch.dead.append((msg, exc.reason, str(exc)))
            return
        batch.rows.setdefault(table, []).append(row)

    def store(self, batch: Batch, stop: threading.Event) -> None:
        """Insert, dead-letter and commit ``batch`` on this thread, retrying while the store
        is unreachable."""
        self._metrics.batch_rows.observe(batch.size)
        if self._retry(batch, stop, attempt=0):
            self._commit(batch)

    def _retry(self, batch: Batch, stop: threading.Event, attempt: int) -> bool:
        """Insert what ``batch`` still holds; after a failure, pause the partitions for a
        backoff and try again, until it is stored (True) or ``stop`` is set (False: the batch
        stays uncommitted, and the partitions' next owner consumes it again)."""
        while True:
            if attempt:
                if stop.is_set():
                    log.warning("stopping with a batch not stored; it will be consumed again")
                    return False
                self._wait(self._backoff.delay(attempt), stop)
            try:
                self._insert_all(batch)
                return True
            except (StoreError, KafkaException) as exc:
                attempt += 1
                self._metrics.insert_failures.labels("transient").inc()
                log.warning("storing a batch failed (attempt %d): %s", attempt, exc)

    def _insert_all(self, batch: Batch) -> None:
        for table, rows in list(batch.rows.items()):
            self._insert(table, rows, batch)
            del batch.rows[table]  # stored: a retry of the batch must not insert it again
        if batch.dead:
            self._dead_letter(batch.dead)
            batch.dead = []

    def _insert(self, table: str, rows: list[dict[str, Any]], batch: Batch) -> None:
        started = time.perf_counter()
        try:
            self._store.insert_json(table, encode_rows(rows))
        except StoreError as exc:
            if exc.transient:
                raise
            self._metrics.insert_failures.labels("refused").inc()
            log.warning(
                "the store refused a batch of %d %s rows; inserting one by one: %s",
                len(rows),
                table,
                exc,
            )
            self._insert_one_by_one(table, rows, batch)
            return
        self._metrics.insert_seconds.labels(table).observe(time.perf_counter() - started)
        self._metrics.rows.labels(table).inc(len(rows))

    def _insert_one_by_one(self, table: str, rows: list[dict[str, Any]], batch: Batch) -> None:
        for row in rows:
            try:
                self._store.insert_json(table, encode_rows([row]))
            except StoreError as exc:
                if exc.transient:
                    raise
                batch.dead.append((_RowMessage(row, table), "store_refused", str(exc)[:500]))
            else:
                self._metrics.rows.labels(table).inc()

    def _dead_letter(self, dead: list[tuple[Any, str, str]]) -> None:
        failed: list[str] = []

        def delivered(err: Any, _msg: Message) -> None:
            if err is not None:
                failed.append(str(err))

        for msg, reason, detail in dead:
            headers = {
                DLQ_REASON: reason.encode(),
                DLQ_DETAIL: detail.encode(errors="replace")[:1000],
                DLQ_SOURCE: f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode(),
            }
            self._dlq.produce(
                self._cfg.dlq_topic, msg.value(), msg.key(), headers=headers, on_delivery=delivered
            )
        remaining = self._dlq.flush(self._cfg.feedback_timeout_s * 2)
        if remaining or failed:
            raise KafkaException(f"dead letters not confirmed: {failed[:1] or remaining}")
        for _msg, reason, detail in dead:
            self._metrics.dead_letters.labels(reason).inc()
            log.warning("dead-lettered %s: %s", _msg_source(_msg), detail)

    def _commit(self, batch: Batch) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in batch.offsets.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # e.g. revoked meanwhile: the next owner stores it again
            log.warning("offset commit failed (the batch may be stored twice): %s", exc)
            return
        self._metrics.committed_at.set(time.time())

    def _wait(self, seconds: float, stop: threading.Event) -> None:
        """Sleep with the partitions paused, serving the group (heartbeats, rebalances)."""
        assignment = self._consumer.assignment()
        self._consumer.pause(assignment)
        try:
            deadline = self._clock() + seconds
            while self._clock() < deadline and not stop.is_set():
                msg = self._consumer.poll(min(0.2, max(0.0, deadline - self._clock())))
                if msg is not None and msg.error() is None:  # a partition assigned meanwhile
                    self._pending.append(msg)
        finally:
            self._consumer.resume(self._consumer.assignment())


class _RowMessage:
    """A stored-row stand-in for a message: what the dead-letter topic needs."""

    def __init__(self, row: dict[str, Any], table: str) -> None:
        self._row, self._table = row, table

    def topic(self) -> str:
        return str(self._row.get("source_topic") or self._table)

    def partition(self) -> int:
        return int(self._row.get("source_partition", -1))

    def offset(self) -> int:
        return int(self._row.get("source_offset", -1))

    def value(self) -> bytes:
        return encode_rows([self._row]).rstrip(b"\n")

    def key(self) -> bytes | None:
        rid = self._row.get("request_id")
        return str(rid).encode() if rid is not None else None


def _msg_source(msg: Any) -> str:
    return f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
