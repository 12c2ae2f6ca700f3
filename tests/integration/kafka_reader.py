"""Read a whole Kafka topic back in tests (every partition, start to high watermark)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition


def consume_all(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every message now in ``topic`` (all partitions, start to high watermark), decoded."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        high = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        pending = {p for p, offset in high.items() if offset > 0}
        values: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while pending:
            assert time.monotonic() < deadline, f"{topic}: partitions {pending} not read in time"
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            value = json.loads(msg.value())
            assert msg.key() == value["request_id"].encode()
            values.append(value)
            if msg.offset() + 1 >= high[msg.partition()]:
                pending.discard(msg.partition())
        return values
    finally:
        consumer.close()
