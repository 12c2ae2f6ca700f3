"""Spool slots: each process writing the prediction log owns one spool directory, by lock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from python_backend.predlog.spool import SpoolLockedError

#: slots tried before giving up (a slot is free once its previous owner died or closed)
MAX_SPOOL_SLOTS = 64

T = TypeVar("T")


def open_in_free_slot(
    root: Path, prefix: str, open_log: Callable[[Path], T], max_slots: int = MAX_SPOOL_SLOTS
) -> T:
    """``open_log(root / f"{prefix}-{n}")`` for the first slot ``n`` no live process holds.

    A restarted process takes over the slot a previous one left and replays what that one
    had spooled; two live processes (a worker beside its replacement during a model reload)
    never share one.
    """
    for slot in range(max_slots):
        try:
            return open_log(root / f"{prefix}-{slot}")
        except SpoolLockedError:
            continue
    raise RuntimeError(f"all {max_slots} prediction-log spool slots {root}/{prefix}-* are in use")
