"""What the prediction log counts and tracks while records are on their way to Kafka: counters,
the journal positions in flight, replay batches, and their Prometheus view.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import KafkaError, Message

from python_backend.predlog.spool import SpoolEntry

#: errors a retry cannot fix; such a record is dropped (and counted), not spooled forever
PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
    }
)


COUNTERS: dict[str, str] = {
    "produced": "Prediction records handed to the Kafka producer.",
    "delivered": "Prediction records whose delivery Kafka confirmed.",
    "failed": "Prediction records Kafka did not take in time (sent to the spool).",
    "spooled": "Prediction records written to the on-disk spool.",
    "replayed": "Spooled prediction records delivered to Kafka on replay.",
    "dropped": "Prediction records lost: unserializable, permanently rejected or spool full.",
    "recovered": "Records a crashed process left in flight, moved from its journal to the spool.",
    "unjournaled": "Prediction records the journal could not take (sent without crash safety).",
}


def every_power_of_two(n: int) -> bool:
    """Log the 1st, 2nd, 4th, 8th... occurrence of a repeated error, not each one."""
    return n & (n - 1) == 0


class LogStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)

    def add(self, name: str, n: int = 1) -> int:
        with self._lock:
            self._counts[name] += n
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class InFlight:
    """Journal positions of records not yet confirmed or spooled; settles them in any order
    and tells the oldest position before which every record is settled."""

    def __init__(self, first_ordinal: int) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, SpoolEntry] = {}
        self._settled: set[int] = set()
        self._next = first_ordinal
        self._last: SpoolEntry | None = None

    def add(self, entry: SpoolEntry) -> None:
        with self._lock:
            self._entries[entry.ordinal] = entry

    def settle(self, ordinal: int | None) -> None:
        if ordinal is None:
            return
        with self._lock:
            self._settled.add(ordinal)
            while self._next in self._settled and self._next in self._entries:
                self._settled.remove(self._next)
                self._last = self._entries.pop(self._next)
                self._next += 1

    def take_settled(self) -> SpoolEntry | None:
        """The newest position everything before which is settled, once."""
        with self._lock:
            last, self._last = self._last, None
            return last

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class ReplayBatch:
    """Spooled records re-produced together; acknowledged up to the first failure."""

    def __init__(self, entries: list[SpoolEntry]) -> None:
        self.entries = entries
        self.results: list[KafkaError | bool | None] = [False] * len(entries)  # False: pending
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._settled = 0
        self._sent: int | None = None  # known once sealed

    def callback(self, index: int) -> Callable[[KafkaError | None, Message], None]:
        """The delivery callback of ``entries[index]``."""

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            with self._lock:
                self.results[index] = err
                self._settled += 1
                if self._settled == self._sent:
                    self.done.set()

        return on_delivery

    def seal(self, sent: int) -> None:
        """``sent`` records (the first ones) were produced; no more will be."""
        with self._lock:
            self._sent = sent
            if self._settled == sent:
                self.done.set()

    def finished_prefix(self) -> tuple[int, int, int]:
        """(records at the head that are finished, of which delivered, of which dropped)."""
        delivered = dropped = 0
        with self._lock:
            for result in self.results:
                if result is None:
                    delivered += 1
                elif isinstance(result, KafkaError) and result.code() in PERMANENT_ERRORS:
                    dropped += 1
                else:
                    break
        return delivered + dropped, delivered, dropped


class LogCollector:
    """``stats()`` as Prometheus counters and gauges, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._stats()
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"rtinfer_prediction_log_{name}", doc, value=stats[name])
        yield GaugeMetricFamily(
            "rtinfer_prediction_log_spool_records",
            "Spooled prediction records not yet delivered.",
            value=stats["spool_depth"],
        )
        yield GaugeMetricFamily(
            "rtinfer_prediction_log_spool_bytes",
            "Bytes of the prediction log's spool on disk.",
            value=stats["spool_bytes"],
        )
        yield GaugeMetricFamily(
            "rtinfer_prediction_log_in_flight",
            "Journaled prediction records Kafka has not confirmed yet (nor the spool taken).",
            value=stats["in_flight"],
        )
