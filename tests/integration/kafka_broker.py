"""A private Kafka broker for module-scoped test fixtures (free ports, temp data dir)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rtinfer.kafka_server import DEFAULT_TOPICS, ensure_topics, kafka_libs, start_kafka
from rtinfer.procs import ManagedProcess, free_port

HOST = "127.0.0.1"


@dataclass
class Broker:
    data_dir: Path
    libs: Path
    port: int
    controller_port: int
    proc: ManagedProcess | None = None

    @classmethod
    def new(cls, tmp_path_factory: pytest.TempPathFactory) -> Broker:
        return cls(
            data_dir=tmp_path_factory.mktemp("kafka"),
            libs=kafka_libs(),
            port=free_port(HOST),
            controller_port=free_port(HOST),
        )

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        self.proc = start_kafka(
            self.data_dir, self.port, self.controller_port, host=HOST, libs=self.libs
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def ensure_running(self) -> None:
        if self.proc is None or not self.proc.alive():
            self.start()


def running_broker_with_topics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Body of a module fixture: a private broker with the stack's topics, stopped after."""
    broker = Broker.new(tmp_path_factory)
    broker.start()
    try:
        ensure_topics(broker.bootstrap, DEFAULT_TOPICS)
        yield broker
    finally:
        broker.stop()
