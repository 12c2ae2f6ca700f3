"""How the prediction log is set up: its librdkafka settings, and the spool and journal on disk."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from python_backend.predlog.spool import Spool

#: sub-directory of the spool slot holding the journal of records in flight
JOURNAL_DIR = "journal"


def producer_config_for(
    bootstrap: str, linger_ms: float, compression: str, message_timeout_s: float
) -> dict[str, Any]:
    """The prediction log's librdkafka settings: idempotent, ``acks=all``, batched."""
    return {
        "bootstrap.servers": bootstrap,
        "client.id": "rtinfer-prediction-log",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": linger_ms,
        "compression.type": compression,
        "message.timeout.ms": int(message_timeout_s * 1000),
        "reconnect.backoff.max.ms": 1000,  # find a restarted broker within a second
        "logger": logging.getLogger(f"{__name__}.librdkafka"),
    }


def open_spools(spool_dir: Path, max_bytes: int) -> tuple[Spool, Spool]:
    """The spool of undelivered records and the journal of records in flight beside it."""
    spool = Spool(spool_dir, max_bytes=max_bytes)
    try:
        journal = Spool(
            spool_dir / JOURNAL_DIR,
            max_bytes=max_bytes,
            durable=False,  # appended on the event loop: never wait on the disk
            rotate_when_caught_up=False,
        )
    except BaseException:
        spool.close()
        raise
    return spool, journal
