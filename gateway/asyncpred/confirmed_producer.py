"""A Kafka producer whose ``send`` returns only once the broker confirmed the write.

Idempotent (``enable.idempotence``, ``acks=all``): librdkafka's own retries never duplicate
or reorder. ``send`` hands the message to librdkafka and awaits its delivery report, which a
daemon thread serves (``poll``) and passes to the event loop. ``message.timeout.ms`` equals
the send timeout, so an unconfirmed message normally ends with a definite delivery error
rather than a message that might still be written later; a timeout is still *ambiguous*
(the broker may have written it without the acknowledgement arriving), which callers must
say. A fatal producer error (idempotence state lost) replaces the producer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

log = logging.getLogger(__name__)


class DeliveryFailed(RuntimeError):
    """Kafka did not confirm the message. ``reason``: queue_full, rejected, failed, timeout."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConfirmedProducer:
    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str,
        timeout_s: float,
        producer_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 1,
            "message.timeout.ms": max(1, int(timeout_s * 1000)),
            "reconnect.backoff.max.ms": 1000,
            "logger": logging.getLogger(f"{__name__}.librdkafka"),
            "error_cb": self._on_error,
            **(producer_config or {}),
        }
        self._lock = threading.Lock()
        self._producer = Producer(self._config)
        self._fatal = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._poll_loop, name=f"{client_id}-poll", daemon=True
        )
        self._thread.start()

    async def send(
        self, topic: str, key: bytes, value: bytes, headers: Mapping[str, bytes] | None = None
    ) -> tuple[int, int]:
        """Write one message; return its (partition, offset) once Kafka confirmed it."""
        loop = asyncio.get_running_loop()
        confirmed: asyncio.Future[tuple[int, int]] = loop.create_future()

        def settle(err: KafkaError | None, partition: int, offset: int) -> None:
            if confirmed.done():  # the caller gave up (timeout, cancellation)
                return
            if err is None:
                confirmed.set_result((partition, offset))
            else:
                confirmed.set_exception(DeliveryFailed("failed", f"kafka: {err.str()}"))

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            loop.call_soon_threadsafe(settle, err, msg.partition(), msg.offset())

        try:
            with self._lock:
                self._producer.produce(
                    topic, value, key, headers=dict(headers) if headers else None,
                    on_delivery=on_delivery,
                )  # fmt: skip
        except BufferError:
            raise DeliveryFailed("queue_full", "the Kafka producer queue is full") from None
        except KafkaException as exc:
            raise DeliveryFailed("rejected", f"kafka refused the message: {exc}") from None
        try:
            # a little over message.timeout.ms: the delivery report normally comes first
            return await asyncio.wait_for(confirmed, self.timeout_s + 1.0)
        except asyncio.TimeoutError:
            raise DeliveryFailed(
                "timeout", f"Kafka did not confirm within {self.timeout_s:g}s"
            ) from None

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout_s``) and stop the poll thread."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        with self._lock:
            left = self._producer.flush(timeout_s)
        if left:
            log.warning("%d Kafka messages unconfirmed at close", left)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("kafka producer failed fatally: %s; replacing it", err)
            self._fatal.set()
        elif err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            log.debug("kafka producer: %s", err)
        else:
            log.warning("kafka producer error: %s", err)

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.05)
                if self._fatal.is_set():
                    self._replace()
            except Exception:
                log.exception("kafka producer poll failed")
                self._stop.wait(0.5)

    def _replace(self) -> None:
        with self._lock:
            old = self._producer
            self._producer = Producer(self._config)
            self._fatal.clear()
        # whatever it still held fails now (delivery reports with errors)
        old.purge(in_queue=True, in_flight=True)
        old.flush(1.0)
