"""``python -m gateway.store.sink_service``: one prediction-sink process (a Kafka consumer).

Sinks of one ``store.group_id`` share the partitions of the prediction, shadow and label
topics; run more processes to scale out. The process applies the store's migrations, serves
``/metrics`` (``rtinfer_sink_*``) and stops on SIGTERM after storing the batch in hand.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from prometheus_client import start_http_server

from gateway.asyncpred.lag import LagReader
from gateway.logs import configure_logging
from gateway.settings import Settings
from gateway.store.backend import StoreError, open_store, redact
from gateway.store.migrate import apply_store_migrations
from gateway.store.signals import stop_on_signals
from gateway.store.sink import PredictionSink
from gateway.store.sink_metrics import SinkMetrics

log = logging.getLogger("gateway.sink")  # also when run as __main__

LAG_REFRESH_S = 5.0


def consumer_config(settings: Settings) -> dict[str, Any]:
    cfg = settings.store
    return {
        "bootstrap.servers": settings.kafka_bootstrap(),
        "group.id": cfg.group_id,
        "client.id": f"rtinfer-sink-{os.getpid()}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": cfg.session_timeout_ms,
        "max.poll.interval.ms": 600_000,
        "fetch.max.bytes": 16 * 1024 * 1024,
        "logger": logging.getLogger(f"{log.name}.librdkafka"),
        **({"group.instance.id": cfg.instance_id} if cfg.instance_id else {}),
    }


def dead_letter_producer(settings: Settings) -> Producer:
    return Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap(),
            "client.id": f"rtinfer-sink-dlq-{os.getpid()}",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "logger": logging.getLogger(f"{log.name}.librdkafka"),
        }
    )


def topics(settings: Settings) -> list[str]:
    cfg = settings.store
    return [cfg.predictions_topic, cfg.shadow_topic, cfg.labels_topic]


def _report_lag(
    reader: LagReader, consumer: Consumer, metrics: SinkMetrics, stop: threading.Event
) -> None:
    while not stop.wait(LAG_REFRESH_S):
        try:
            parts = [(tp.topic, tp.partition) for tp in consumer.assignment()]
            by_topic: dict[str, int] = {}
            for (topic, _), lag in reader.read(parts).items():
                by_topic[topic] = by_topic.get(topic, 0) + lag
            for topic, lag in by_topic.items():
                metrics.lag.labels(topic).set(lag)
        except (KafkaException, RuntimeError) as exc:
            log.debug("lag not read: %s", exc)


def serve(settings: Settings, stop: threading.Event) -> None:
    """Run one sink until ``stop`` is set."""
    cfg, url = settings.store, settings.store_url()
    store = open_store(url, timeout_s=cfg.query_timeout_s)
    applied = apply_store_migrations(store)
    log.info("store %s: migrations applied: %s", redact(url), applied or "none pending")
    metrics = SinkMetrics()
    consumer = Consumer(consumer_config(settings))
    consumer.subscribe(topics(settings))
    dlq = dead_letter_producer(settings)
    http = None
    if cfg.metrics_port is not None:
        http, _ = start_http_server(cfg.metrics_port, cfg.metrics_host, metrics.registry)
        log.info("sink metrics on http://%s:%d/metrics", *http.server_address[:2])
    lag = threading.Thread(
        target=_report_lag,
        args=(LagReader(settings.kafka_bootstrap(), cfg.group_id), consumer, metrics, stop),
        name="sink-lag",
        daemon=True,
    )
    lag.start()
    try:
        PredictionSink(consumer, store, dlq, cfg, metrics).run(stop)
    finally:
        consumer.close()  # leaves the group: its partitions move at once
        dlq.flush(5.0)
        store.close()
        if http is not None:
            http.shutdown()


def main(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings.gateway.log_level)
    stop = stop_on_signals()
    try:
        serve(settings, stop)
    except StoreError as exc:
        log.error("the store cannot be used: %s", exc)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
