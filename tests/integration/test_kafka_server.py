"""A real KRaft Kafka broker on free loopback ports, started by the project's tooling."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource
from kafka_broker import Broker

from rtinfer.kafka_server import (
    DEFAULT_TOPICS,
    TopicError,
    TopicSpec,
    ensure_topics,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker.new(tmp_path_factory)
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def topics(broker: Broker) -> list[str]:
    return ensure_topics(broker.bootstrap, DEFAULT_TOPICS)


def produce_one(bootstrap: str, topic: str, key: bytes, value: bytes) -> Message:
    """Produce with an idempotent producer; return the delivery report's message."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    reports: list[tuple[KafkaError | None, Message]] = []
    producer.produce(topic, key=key, value=value, on_delivery=lambda e, m: reports.append((e, m)))
    assert producer.flush(timeout=15) == 0, "message not delivered within 15 s"
    assert len(reports) == 1
    err, msg = reports[0]
    assert err is None, err
    return msg


def consume_key(bootstrap: str, topic: str, key: bytes, timeout_s: float = 30.0) -> Message:
    """Read ``topic`` from the start with a fresh consumer group until ``key`` shows up."""
    group = f"test-{uuid.uuid4().hex}"
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = consumer.poll(timeout=0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            if msg.key() == key:
                # the group's offset is stored by the broker's group coordinator
                consumer.commit(message=msg, asynchronous=False)
                tp = TopicPartition(topic, msg.partition())
                [committed] = consumer.committed([tp], timeout=10)
                assert committed.offset == msg.offset() + 1
                return msg
        pytest.fail(f"key {key!r} not consumed from {topic} within {timeout_s:.0f}s")
    finally:
        consumer.close()


def test_default_topics_have_partitions_and_retention(broker: Broker, topics: list[str]) -> None:
    day_ms = 24 * 3600 * 1000
    expected = {  # name: (partitions, retention.ms)
        "predictions": (6, 7 * day_ms),
        "predictions-shadow": (3, 7 * day_ms),
        "inference-requests": (6, day_ms),
        "inference-requests-dlq": (1, 14 * day_ms),
        "prediction-labels": (3, 30 * day_ms),
        "predictions-dlq": (1, 14 * day_ms),
    }
    assert sorted(topics) == sorted(expected)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    md = admin.list_topics(timeout=10).topics
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in expected]
    configs = {r.name: f.result(timeout=10) for r, f in admin.describe_configs(resources).items()}
    for name, (partitions, retention_ms) in expected.items():
        assert len(md[name].partitions) == partitions, name
        assert all(len(p.replicas) == 1 for p in md[name].partitions.values()), name
        assert configs[name]["retention.ms"].value == str(retention_ms), name


def test_idempotent_producer_round_trip(broker: Broker, topics: list[str]) -> None:
    key = f"req-{uuid.uuid4().hex}".encode()
    value = b'{"user_id": "u_000042", "merchant_id": "m_00007", "amount": 129.99}'
    delivered = produce_one(broker.bootstrap, "inference-requests", key, value)

    got = consume_key(broker.bootstrap, "inference-requests", key)
    assert (got.key(), got.value()) == (key, value)
    assert (got.partition(), got.offset()) == (delivered.partition(), delivered.offset())


def test_ensure_topics_is_idempotent(broker: Broker, topics: list[str]) -> None:
    assert ensure_topics(broker.bootstrap, DEFAULT_TOPICS) == []

    extra = {
        "predictions": DEFAULT_TOPICS["predictions"],
        "test-extra": TopicSpec(partitions=2, retention_ms=60_000),
    }
    assert ensure_topics(broker.bootstrap, extra) == ["test-extra"]
    md = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
    assert len(md["predictions"].partitions) == DEFAULT_TOPICS["predictions"].partitions
    assert len(md["test-extra"].partitions) == 2

    # an existing topic with fewer partitions than asked for is an error, not left silently
    with pytest.raises(TopicError, match="predictions-shadow has 3 partitions, 12 required"):
        ensure_topics(broker.bootstrap, {"predictions-shadow": TopicSpec(12, 60_000)})


def test_restart_keeps_messages(broker: Broker, topics: list[str]) -> None:
    key = f"pred-{uuid.uuid4().hex}".encode()
    value = b'{"prediction": 0.93, "label": "fraud"}'
    delivered = produce_one(broker.bootstrap, "predictions", key, value)

    broker.stop()
    assert broker.proc is not None and not broker.proc.alive()
    broker.start()

    got = consume_key(broker.bootstrap, "predictions", key)
    assert (got.key(), got.value()) == (key, value)
    assert (got.partition(), got.offset()) == (delivered.partition(), delivered.offset())
    assert ensure_topics(broker.bootstrap, DEFAULT_TOPICS) == []
