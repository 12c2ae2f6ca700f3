"""Queue lag of async workers: per partition, the high watermark minus the group's commit.

Read through an ``AdminClient`` of its own (two batched requests per refresh: the group's
committed offsets and the partitions' latest offsets), never through the worker's consumer:
``Consumer.get_watermark_offsets`` costs a broker round trip per partition on the thread
that polls, and would stall consumption while it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from gateway.asyncpred.offsets import Partition

log = logging.getLogger(__name__)


class LagReader:
    def __init__(self, bootstrap: str, group: str, timeout_s: float = 5.0) -> None:
        self._admin = AdminClient(
            {"bootstrap.servers": bootstrap, "logger": logging.getLogger(f"{__name__}.librdkafka")}
        )
        self._group = group
        self._timeout_s = timeout_s

    def read(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """Lag of each partition (blocking; run it in a thread). Raises ``KafkaException``."""
        if not partitions:
            return {}
        tps = [TopicPartition(t, p) for t, p in partitions]
        request = [ConsumerGroupTopicPartitions(self._group, tps)]
        [future] = self._admin.list_consumer_group_offsets(
            request, request_timeout=self._timeout_s
        ).values()
        committed = {(tp.topic, tp.partition): tp.offset for tp in future.result().topic_partitions}
        latest = self._offsets(tps, OffsetSpec.latest())
        never = [tp for tp in tps if committed.get((tp.topic, tp.partition), -1) < 0]
        earliest = self._offsets(never, OffsetSpec.earliest()) if never else {}
        lags: dict[Partition, int] = {}
        for key, high in latest.items():
            base = committed.get(key, -1)
            if base < 0:  # nothing committed yet: the group starts at the oldest message
                base = earliest.get(key, 0)
            lags[key] = max(0, high - base)
        return lags

    def _offsets(self, tps: list[TopicPartition], spec: OffsetSpec) -> dict[Partition, int]:
        futures = self._admin.list_offsets(
            {tp: spec for tp in tps}, request_timeout=self._timeout_s
        )
        out: dict[Partition, int] = {}
        for tp, future in futures.items():
            try:
                out[(tp.topic, tp.partition)] = future.result().offset
            except KafkaException as exc:  # e.g. leader moving: skip it this round
                log.debug("offsets of %s/%d not read: %s", tp.topic, tp.partition, exc)
        return out
