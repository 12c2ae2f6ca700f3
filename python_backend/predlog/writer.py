r"""The prediction log: one Kafka message per prediction, spooled to disk when Kafka cannot take it.

``log(record)`` runs on the gateway's event loop right after a response is computed. It
serializes the record, appends it to an on-disk *journal* (one ``write(2)``, never ``fsync``) and
hands it to librdkafka's in-memory queue (``produce`` never does network I/O), so it costs
tens of microseconds and never raises. The journal is what a ``kill -9`` cannot take away:
a record stays in it until Kafka confirmed it or it reached the spool, and a process opening
the same spool slot after a crash moves what the journal still holds into the spool, so
records queued in librdkafka's memory (during ``linger_ms``, or for up to
``message_timeout_s`` while Kafka is away) survive the process. Two background threads do
the rest:

* the *pump* serves librdkafka's delivery reports (``poll``): a confirmed message is counted,
  a failed one (timed out, broker down, producer fatal) is appended to the on-disk
  :class:`~python_backend.predlog.spool.Spool`, as are records ``produce`` refused because
  the queue was full. It also ``fsync``\s the spool on its time budget.
* the *replayer* re-produces spooled records, oldest first, whenever the spool is not empty
  and the broker answers a metadata request, and acknowledges them in the spool only once
  Kafka confirmed their delivery.

``close()`` flushes what is queued; whatever is not delivered within its timeout is spooled,
so a shutdown while Kafka is down loses nothing. Delivery is at least once: see
``docs/prediction-log.md``."""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from python_backend.predlog.bookkeeping import (
    PERMANENT_ERRORS,
    InFlight,
    LogCollector,
    LogStats,
    ReplayBatch,
    every_power_of_two,
)
from python_backend.predlog.config import open_spools, producer_config_for
from python_backend.predlog.records import encode_record, topic_and_key, topic_and_key_of
from python_backend.predlog.spool import SpoolError, SpoolFullError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry


log = logging.getLogger(__name__)


#: how often the pump persists the journal's acknowledged position
JOURNAL_ACK_INTERVAL_S = 0.2


class KafkaPredictionLog:
    """Prediction records to Kafka (``arm == "shadow"`` to ``shadow_topic``), keyed by request id.

    Starts its background threads on construction; call ``close`` once the gateway stops
    taking requests (from ``lifespan``: ``await asyncio.to_thread(plog.close, 10.0)``).
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        spool_dir: Path | str,
        topic: str = "predictions",
        shadow_topic: str = "predictions-shadow",
        message_timeout_s: float = 30.0,
        linger_ms: float = 5.0,
        compression: str = "lz4",
        max_queued_messages: int = 100_000,
        max_queued_kbytes: int = 128 * 1024,
        max_overflow: int = 100_000,
        spool_max_bytes: int = 1 << 30,
        replay_batch: int = 500,
        replay_interval_s: float = 1.0,
        producer_config: Mapping[str, Any] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.topic = topic
        self.shadow_topic = shadow_topic
        self._message_timeout_s = message_timeout_s
        self._max_overflow = max_overflow
        self._replay_batch = replay_batch
        self._replay_interval_s = replay_interval_s
        self._config = {
            **producer_config_for(bootstrap, linger_ms, compression, message_timeout_s),
            "queue.buffering.max.messages": max_queued_messages,
            "queue.buffering.max.kbytes": max_queued_kbytes,
            "error_cb": self._on_error,
            **(producer_config or {}),
        }
        self._stats = LogStats()
        # records produce() refused (queue full) with their journal ordinal; the pump moves
        # them to the spool
        self._overflow: collections.deque[tuple[bytes, int | None]] = collections.deque()
        self._stop = threading.Event()
        self._fatal = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        self._pending_replay: ReplayBatch | None = None
        self._spool, self._journal = open_spools(Path(spool_dir), spool_max_bytes)
        try:
            self._recover_journal()
            self._in_flight = InFlight(self._journal.next_ordinal)
            self._journal_acked_at = time.monotonic()
            self._producer = Producer(self._config)
        except BaseException:
            self._journal.close()
            self._spool.close()
            raise
        self._pump = threading.Thread(target=self._pump_loop, name="plog-pump", daemon=True)
        self._replayer = threading.Thread(target=self._replay_loop, name="plog-replay", daemon=True)
        self._pump.start()
        self._replayer.start()
        self._registry = registry
        self._collector = LogCollector(self.stats)
        if registry is not None:
            registry.register(self._collector)

    # -- the request path ----------------------------------------------------------------

    def log(self, record: Mapping[str, Any]) -> None:
        """Queue one prediction record for Kafka. Non-blocking; never raises."""
        self.log_many((record,))

    def log_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Queue prediction records for Kafka, journaled with one ``write(2)`` for all (a
        dynamic batch at a time, from the pipeline). Non-blocking; never raises."""
        queued: list[tuple[str, str | None, bytes]] = []
        for record in records:
            try:
                if self._closed:
                    raise RuntimeError("prediction log is closed")
                value = encode_record(record)
                queued.append((*topic_and_key(record, self.topic, self.shadow_topic), value))
            except Exception:
                if every_power_of_two(self._stats.add("dropped")):
                    log.exception("prediction record dropped (not serializable or log closed)")
        if not queued:
            return
        ordinals = self._journal_append([value for _, _, value in queued])
        for (topic, key, value), ordinal in zip(queued, ordinals, strict=True):
            self._produce(topic, value, key, ordinal)

    def _produce(self, topic: str, value: bytes, key: str | None, ordinal: int | None) -> None:
        try:
            self._producer.produce(
                topic, value, key, on_delivery=functools.partial(self._on_delivery, ordinal)
            )
            self._stats.add("produced")
        except BufferError:  # librdkafka's queue is full: Kafka has been away for a while
            self._stats.add("failed")
            self._to_overflow(value, ordinal)
        except KafkaException as exc:
            err = exc.args[0]
            if isinstance(err, KafkaError) and err.code() in PERMANENT_ERRORS:
                self._drop(f"rejected by the producer: {err}", ordinal=ordinal)
            else:
                self._stats.add("failed")
                self._to_overflow(value, ordinal)
        except Exception:
            self._drop("produce failed unexpectedly", exc_info=True, ordinal=ordinal)

    def _journal_append(self, values: list[bytes]) -> list[int | None]:
        """Journal the records; their ordinals, or ``None`` each when the journal cannot take
        them (they still go to Kafka, only without crash protection)."""
        try:
            entries = self._journal.append_many(values)
        except (SpoolError, ValueError) as exc:
            if every_power_of_two(self._stats.add("unjournaled", len(values))):
                log.error("prediction log journal refused %d records: %s", len(values), exc)
            return [None] * len(values)
        for entry in entries:
            self._in_flight.add(entry)
        return [entry.ordinal for entry in entries]

    def stats(self) -> dict[str, int]:
        """Counters since start (see ``COUNTERS``) plus the spool's depth and size."""
        return {
            **self._stats.snapshot(),
            "spool_depth": self._spool.depth,
            "spool_bytes": self._spool.size_bytes,
            "in_flight": len(self._in_flight),
        }

    # -- shutdown ------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued within ``timeout_s``; spool the rest; stop the threads."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._replayer.join(timeout=max(0.1, deadline - time.monotonic()))
        self._pump.join(timeout=max(0.1, deadline - time.monotonic()))
        remaining = self._producer.flush(max(0.0, deadline - time.monotonic()))
        if remaining:
            log.warning(
                "%d prediction records not delivered within %.1fs; spooling them",
                remaining, timeout_s,
            )  # fmt: skip
            self._purge(self._producer)
        if self._pending_replay is not None:
            self._finish_replay(self._pending_replay)
        self._drain_overflow()
        self._ack_journal()
        self._journal.close()
        self._spool.close()
        log.info("prediction log closed: %s", self.stats())
        if self._registry is not None:  # a log opened later on this registry takes its names
            self._registry.unregister(self._collector)

    # -- delivery reports and the spool (pump thread, or close) --------------------------

    def _on_delivery(self, ordinal: int | None, err: KafkaError | None, msg: Message) -> None:
        try:
            if err is None:
                self._stats.add("delivered")
            elif err.code() in PERMANENT_ERRORS:
                self._drop(f"rejected by Kafka: {err}")
            else:
                n = self._stats.add("failed")
                if every_power_of_two(n):
                    log.warning(
                        "prediction record not delivered (%s); spooling (%d so far)", err, n
                    )
                value = msg.value()
                if value is not None:
                    self._to_spool(value)
        except Exception:  # an exception here would surface in poll() instead
            log.exception("delivery report handling failed")
        finally:
            self._in_flight.settle(ordinal)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("prediction log producer failed fatally: %s; replacing it", err)
            self._fatal.set()
        elif err.code() == KafkaError._TRANSPORT:  # each reconnect attempt; librdkafka retries
            log.debug("prediction log: %s", err)
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("prediction log: Kafka unreachable (%s); records will be spooled", err)
        else:
            log.warning("prediction log producer error: %s", err)

    def _to_overflow(self, value: bytes, ordinal: int | None) -> None:
        if len(self._overflow) >= self._max_overflow:
            self._drop("the overflow queue is full", ordinal=ordinal)
        else:
            self._overflow.append((value, ordinal))

    def _drain_overflow(self) -> None:
        while self._overflow:
            value, ordinal = self._overflow.popleft()
            self._to_spool(value)
            self._in_flight.settle(ordinal)

    def _to_spool(self, value: bytes) -> None:
        try:
            self._spool.append(value)
        except SpoolFullError as exc:
            self._drop(str(exc))
        except (SpoolError, ValueError) as exc:
            self._drop(f"spool write failed: {exc}")
        else:
            self._stats.add("spooled")

    def _drop(self, reason: str, exc_info: bool = False, ordinal: int | None = None) -> None:
        self._in_flight.settle(ordinal)
        n = self._stats.add("dropped")
        if every_power_of_two(n):
            log.error(
                "prediction record dropped: %s (%d dropped so far)", reason, n, exc_info=exc_info
            )

    def _purge(self, producer: Producer) -> None:
        """Fail everything queued or in flight; the delivery reports spool those records."""
        producer.purge(in_queue=True, in_flight=True)
        producer.flush(5.0)  # purged messages report at once

    def _ack_journal(self) -> None:
        """Persist the journal position before which every record is confirmed or spooled."""
        settled = self._in_flight.take_settled()
        if settled is not None:
            self._journal.ack(settled)
        self._journal_acked_at = time.monotonic()

    def _recover_journal(self) -> None:
        """Move what a previous owner of this slot left in flight into the spool."""
        moved = 0
        while entries := self._journal.read(self._replay_batch):
            for entry in entries:
                self._to_spool(entry.payload)
            self._journal.ack(entries[-1])
            moved += len(entries)
        if moved:
            self._stats.add("recovered", moved)
            log.warning(
                "moved %d in-flight prediction records of a crashed process to the spool", moved
            )

    def _pump_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.05)
                self._drain_overflow()
                self._spool.sync_if_due()
                if time.monotonic() - self._journal_acked_at >= JOURNAL_ACK_INTERVAL_S:
                    self._ack_journal()
                if self._fatal.is_set():
                    self._replace_producer()
            except Exception:
                log.exception("prediction log pump iteration failed")
                self._stop.wait(0.5)

    def _replace_producer(self) -> None:
        old = self._producer
        self._producer = Producer(self._config)
        self._fatal.clear()
        self._purge(old)

    # -- replay (replayer thread) --------------------------------------------------------

    def _replay_loop(self) -> None:
        while not self._stop.is_set():
            try:
                progressed = (
                    self._spool.depth > 0
                    and self._broker_reachable()
                    and not self._stop.is_set()
                    and self._replay_once()
                )
            except Exception:
                log.exception("prediction log replay failed")
                progressed = False
            if not progressed:
                self._stop.wait(self._replay_interval_s)

    def _broker_reachable(self) -> bool:
        try:
            metadata = self._producer.list_topics(self.topic, timeout=1.0)
        except KafkaException:
            return False
        return bool(metadata.brokers)

    def _replay_once(self) -> bool:
        """Re-produce one batch from the spool; True when all of it was delivered."""
        entries = self._spool.read(self._replay_batch)
        if not entries:
            return False
        batch = ReplayBatch(entries)
        self._pending_replay = batch
        sent = 0
        for entry in entries:
            topic, key = topic_and_key_of(entry.payload, self.topic, self.shadow_topic)
            try:
                self._producer.produce(topic, entry.payload, key, on_delivery=batch.callback(sent))
            except (BufferError, KafkaException) as exc:  # live traffic first; rest next round
                log.info("replay paused after %d records: %r", sent, exc)
                break
            sent += 1
        batch.seal(sent)
        deadline = time.monotonic() + self._message_timeout_s + 5.0
        while not batch.done.wait(0.1):
            if self._stop.is_set():
                return False  # close() flushes and acknowledges what was delivered
            if time.monotonic() > deadline:
                log.warning("replay batch unconfirmed after %.0fs", self._message_timeout_s + 5)
                break
        return self._finish_replay(batch) == len(entries)

    def _finish_replay(self, batch: ReplayBatch) -> int:
        """Acknowledge the finished head of ``batch``; return how many records that was."""
        finished, delivered, dropped = batch.finished_prefix()
        if finished:
            self._stats.add("replayed", delivered)  # before the spool shrinks: stats stay ordered
            if dropped:
                self._stats.add("dropped", dropped)
                log.error("%d spooled prediction records rejected permanently by Kafka", dropped)
            self._spool.ack(batch.entries[finished - 1])
        self._pending_replay = None
        return finished
