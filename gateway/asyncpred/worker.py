"""``python -m gateway.asyncpred.worker``: one async-prediction worker process (a Kafka consumer).

Workers of one ``consumer_group`` share the partitions of ``inference-requests``; run more
processes to scale out (up to the partition count). Each process runs up to
``concurrency`` jobs at once (:class:`~gateway.asyncpred.jobs.JobRunner`) and commits, per
partition, only the offset below which every message is finished
(:class:`~gateway.asyncpred.offsets.CommitTracker`), so a crash redelivers everything not
finished and loses nothing. Auto-commit is off.

All consumer calls (poll, commit, pause/resume) run on one dedicated thread; the
rebalance callbacks run there too, inside ``poll``. On revocation the worker commits what
is finished in the revoked partitions; messages still running there are finished by their
task, but their offsets are left to the partition's next owner (who may run them again).

With ``metrics_port`` set the process serves ``/metrics`` (prediction stages, Triton calls,
async jobs, callbacks, DLQ and queue lag per assigned partition).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, start_http_server

from gateway.asyncpred.backoff import Backoff
from gateway.asyncpred.callback_delivery import CallbackSender
from gateway.asyncpred.callback_url import parse_networks
from gateway.asyncpred.config import secret_bytes
from gateway.asyncpred.confirmed_producer import ConfirmedProducer
from gateway.asyncpred.jobs import JobRunner
from gateway.asyncpred.lag import LagReader
from gateway.asyncpred.metrics import AsyncWorkerMetrics
from gateway.asyncpred.offsets import CommitTracker, Partition, Ticket
from gateway.asyncpred.results import ResultStore
from gateway.logs import configure_logging
from gateway.metrics import GatewayMetrics
from gateway.serving.core import open_serving_core, result_store_url
from gateway.serving.health import HealthTracker
from gateway.settings import Settings

log = logging.getLogger("gateway.worker")  # also when run as __main__

T = TypeVar("T")
POLL_TIMEOUT_S = 0.2
CALLBACK_SECRET_FILE = "callback-secret"


def consumer_config(settings: Settings) -> dict[str, Any]:
    cfg = settings.gateway.async_predict
    return {
        "bootstrap.servers": settings.kafka_bootstrap(),
        "group.id": cfg.consumer_group,
        "client.id": f"rtinfer-async-worker-{os.getpid()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # a new group starts at the oldest job, not at the next one submitted
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": cfg.session_timeout_ms,
        "heartbeat.interval.ms": min(3000, cfg.session_timeout_ms // 3),
        "logger": logging.getLogger(f"{log.name}.librdkafka"),
        "error_cb": _on_error,
    }


def _on_error(err: KafkaError) -> None:
    if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
        log.debug("kafka consumer: %s", err)  # librdkafka reconnects by itself
    else:
        log.warning("kafka consumer error: %s", err)


def _keys(partitions: list[TopicPartition]) -> list[Partition]:
    return [(tp.topic, tp.partition) for tp in partitions]


class AsyncWorker:
    """The consume loop: take messages while below ``concurrency``, run, commit, report lag."""

    def __init__(
        self,
        *,
        config: dict[str, Any],
        topic: str,
        concurrency: int,
        runner: JobRunner,
        metrics: AsyncWorkerMetrics,
        lag: LagReader,
        lag_refresh_s: float,
        shutdown_grace_s: float,
    ) -> None:
        self._config = config
        self._lag = lag
        self._topic = topic
        self._concurrency = concurrency
        self._runner = runner
        self._metrics = metrics
        self._lag_refresh_s = lag_refresh_s
        self._grace_s = shutdown_grace_s
        self._tracker = CommitTracker()
        self._tasks: set[asyncio.Task[None]] = set()
        self._commit_wanted = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="async-consumer")
        self._consumer: Consumer | None = None

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Consume until ``stop`` is set, then drain (up to the grace period) and leave."""
        consumer = self._consumer = await self._call(Consumer, self._config)
        await self._call(
            consumer.subscribe,
            [self._topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        background = [
            asyncio.create_task(self._commit_loop(), name="async-commit"),
            asyncio.create_task(self._lag_loop(), name="async-lag"),
        ]
        log.info("async worker consuming %s", self._topic)
        if on_ready is not None:
            on_ready()
        try:
            await self._consume(consumer, stop)
        finally:
            await self._drain()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._commit()
            await self._call(consumer.close)  # leaves the group: partitions move at once
            self._executor.shutdown(wait=True)
            log.info("async worker stopped")

    async def _consume(self, consumer: Consumer, stop: asyncio.Event) -> None:
        paused = False
        while not stop.is_set():
            full = len(self._tasks) >= self._concurrency
            if full or paused:
                assignment = await self._call(consumer.assignment)
                if assignment:
                    await self._call(consumer.pause if full else consumer.resume, assignment)
                paused = full
            msg = await self._call(consumer.poll, POLL_TIMEOUT_S)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka consumer: %s", err)
                continue
            ticket = self._tracker.take((msg.topic(), msg.partition()), msg.offset())
            task = asyncio.create_task(self._process(ticket, msg.key(), msg.value() or b""))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _process(self, ticket: Ticket, key: bytes | None, value: bytes) -> None:
        self._metrics.in_flight.inc()
        try:
            try:
                outcome = await self._runner.run(key, value)
            except Exception:  # a defect: park the message in the DLQ rather than loop on it
                log.exception("async job at %s/%d raised", ticket.partition, ticket.offset)
                await self._runner.dead_letter_raw(key, value, "worker_error")
                outcome = "dead_lettered"
            log.debug("job at %s offset %d: %s", ticket.partition, ticket.offset, outcome)
        finally:
            self._metrics.in_flight.dec()
        if self._tracker.finish(ticket):
            self._commit_wanted.set()

    async def _drain(self) -> None:
        if self._tasks:
            log.info("waiting up to %.0fs for %d running jobs", self._grace_s, len(self._tasks))
            await asyncio.wait(set(self._tasks), timeout=self._grace_s)
        for task in list(self._tasks):  # not committed: the next owner runs them again
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            await self._commit()

    async def _commit(self) -> None:
        positions = self._tracker.committable()
        if positions and self._consumer is not None:
            await self._call(self._commit_now, self._consumer, positions)

    def _commit_now(self, consumer: Consumer, positions: dict[Partition, int]) -> None:
        """Commit ``positions`` synchronously (consumer thread); failures are retried later."""
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        try:
            results = consumer.commit(offsets=offsets, asynchronous=False) or []
        except KafkaException as exc:
            self._metrics.commits.labels("error").inc()
            log.warning("offset commit failed: %s", exc)
            return
        done = {(tp.topic, tp.partition): tp.offset for tp in results if tp.error is None}
        self._tracker.committed(done)
        self._metrics.commits.labels("ok" if len(done) == len(offsets) else "error").inc()

    # -- rebalance callbacks: on the consumer thread, inside poll() -------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._tracker.assign(_keys(partitions))
        log.info("partitions assigned: %s", [p for _, p in _keys(partitions)])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = _keys(partitions)
        positions = self._tracker.committable(keys)
        if positions:
            self._commit_now(consumer, positions)
        self._forget(keys)
        log.info("partitions revoked: %s", [p for _, p in keys])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget(_keys(partitions))
        log.warning("partitions lost: %s", [p for _, p in _keys(partitions)])

    def _forget(self, keys: list[Partition]) -> None:
        self._tracker.revoke(keys)
        for topic, partition in keys:
            with contextlib.suppress(KeyError):  # never refreshed
                self._metrics.queue_lag.remove(topic, str(partition))

    # -- queue lag -------------------------------------------------------------------------

    async def _lag_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lag_refresh_s)
            assigned = self._tracker.partitions()
            try:
                lags = await asyncio.to_thread(self._lag.read, assigned)
            except KafkaException as exc:
                log.debug("queue lag not refreshed: %s", exc)
                continue
            current = set(self._tracker.partitions())  # a rebalance may have run meanwhile
            for (topic, partition), lag in lags.items():
                if (topic, partition) in current:
                    self._metrics.queue_lag.labels(topic, str(partition)).set(lag)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Build the serving core and the job pipeline from ``settings``; consume until ``stop``."""
    cfg = settings.gateway.async_predict
    registry = CollectorRegistry()
    gateway_metrics = GatewayMetrics(registry)
    metrics = AsyncWorkerMetrics(registry)
    backoff = Backoff(cfg.backoff_base_s, max(cfg.backoff_cap_s, cfg.backoff_base_s))
    callbacks = CallbackSender(
        secret=secret_bytes(cfg.callback_secret, settings.state_dir, CALLBACK_SECRET_FILE),
        allowed_networks=parse_networks(cfg.allowed_callback_networks),
        timeout_s=cfg.callback_timeout_s,
        dns_timeout_s=cfg.dns_timeout_s,
        max_attempts=cfg.callback_attempts,
        backoff=backoff,
        on_attempt=lambda outcome: metrics.callbacks.labels(outcome).inc(),
    )
    core_cm = open_serving_core(settings, gateway_metrics, HealthTracker(), door="async",
                                default_deadline_ms=cfg.default_deadline_ms)  # fmt: skip
    async with core_cm as core:
        store = ResultStore.from_url(result_store_url(settings), cfg.result_ttl_s)
        dead_letters = ConfirmedProducer(
            settings.kafka_bootstrap(),
            client_id="rtinfer-async-dlq",
            timeout_s=max(5.0, cfg.enqueue_timeout_s),
        )
        runner = JobRunner(
            service=core.service,
            store=store,
            callbacks=callbacks,
            dead_letters=dead_letters,
            dlq_topic=cfg.dlq_topic,
            metrics=metrics,
            predict_attempts=cfg.predict_attempts,
            backoff=backoff,
        )
        worker = AsyncWorker(
            config=consumer_config(settings),
            topic=cfg.requests_topic,
            concurrency=cfg.concurrency,
            runner=runner,
            metrics=metrics,
            lag=LagReader(settings.kafka_bootstrap(), cfg.consumer_group),
            lag_refresh_s=cfg.lag_refresh_s,
            shutdown_grace_s=cfg.shutdown_grace_s,
        )
        http = None

        def ready() -> None:
            nonlocal http
            if cfg.metrics_port is not None:
                http, _ = start_http_server(cfg.metrics_port, cfg.metrics_host, registry)
                log.info("worker metrics on http://%s:%d/metrics", *http.server_address[:2])

        try:
            await worker.run(stop, on_ready=ready)
        finally:
            if http is not None:
                http.shutdown()
            await store.close()
            await asyncio.to_thread(dead_letters.close, 5.0)


async def run_until_signalled(settings: Settings) -> None:
    """:func:`serve` until SIGTERM or SIGINT, then drain and leave the group."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


def main(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings.gateway.log_level)
    asyncio.run(run_until_signalled(settings))


if __name__ == "__main__":
    main()
