"""A crash-safe, append-only on-disk spool of byte records (the prediction log's fallback).

Layout of the spool directory::

    000000000001.seg   segment files, written in sequence order, one record per line:
    000000000002.seg       b"<crc32 of payload, 8 hex digits> <payload>\\n"
    ack                the acknowledged position "<segment> <byte offset>\\n"
    .lock              flock'ed by the one process that owns the spool

Records are read back in append order from the acknowledged position. A reader acknowledges
a record once it is done with it (for the prediction log: Kafka confirmed its delivery); a
reader that crashes before acknowledging gets the same records again after a restart, so
consumers of what is replayed see duplicates, never gaps. Fully acknowledged segments are
deleted.

Durability window: ``append`` writes each line with one ``write(2)`` (so a process crash
loses nothing that ``append`` returned for) and ``fsync``\\s the segment every
``fsync_every`` records, when ``fsync_interval_s`` has passed since the last ``fsync`` (on
``append`` or ``sync_if_due``, which the owner calls periodically) and when a segment is
closed. An OS crash or power loss can therefore lose the records appended since the last
``fsync``: at most ``fsync_every`` records or ``fsync_interval_s`` plus the owner's
``sync_if_due`` period. A torn or corrupt line (bad checksum, no newline) left by such a crash
is skipped with a warning, never fatal; each open starts a new segment so nothing is ever
appended after a torn tail.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".seg"
SEGMENT_NAME = re.compile(r"^(\d{12})\.seg$")
ACK_FILE = "ack"
LOCK_FILE = ".lock"
CRC_HEX = 8  # "%08x" then one space before the payload


class SpoolError(RuntimeError):
    """The spool could not store or read records."""


class SpoolFullError(SpoolError):
    """Appending would make the spool larger than its ``max_bytes``."""


class SpoolLockedError(SpoolError):
    """Another spool object (in this or another process) owns the directory."""


@dataclass(frozen=True)
class SpoolEntry:
    """One stored record; ``ack(entry)`` acknowledges it and everything before it."""

    payload: bytes
    segment: int
    end_offset: int  # byte offset just past the record's line in its segment
    ordinal: int  # position in append order since this spool object was opened


def _segment_name(seq: int) -> str:
    return f"{seq:012d}{SEGMENT_SUFFIX}"


def _encode(payload: bytes) -> bytes:
    if b"\n" in payload:
        raise ValueError("spool payloads are single lines; found a newline")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _decode(line: bytes) -> bytes | None:
    """The payload of a complete, intact line, else None."""
    if len(line) < CRC_HEX + 2 or not line.endswith(b"\n") or line[CRC_HEX : CRC_HEX + 1] != b" ":
        return None
    payload = line[CRC_HEX + 1 : -1]
    try:
        crc = int(line[:CRC_HEX], 16)
    except ValueError:
        return None
    return payload if zlib.crc32(payload) == crc else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Append-only segmented record spool with an acknowledged read position.

    Thread-safe: one writer thread and one reader thread may use it concurrently. One spool
    object per directory (enforced with ``flock``); give every process its own directory.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 8 << 20,
        fsync_every: int = 100,
        fsync_interval_s: float = 0.05,
        durable: bool = True,
        rotate_when_caught_up: bool = True,
    ) -> None:
        """``durable=False``: never ``fsync`` (records and acks survive a process crash, as
        every ``write`` reaches the page cache at once, but not an OS crash): for a journal
        appended from a latency-sensitive thread, which must never wait on the disk.
        ``rotate_when_caught_up=False``: an ack of everything keeps writing the same segment
        (deleted once full and acknowledged) instead of starting a new file each time."""
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync_every = fsync_every
        self.fsync_interval_s = fsync_interval_s
        self.durable = durable
        self.rotate_when_caught_up = rotate_when_caught_up
        self._bad_lines: set[tuple[int, int]] = set()  # (segment, offset) of skipped lines
        self._lock = threading.Lock()
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fh = (self.directory / LOCK_FILE).open("a")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_fh.close()
            raise SpoolLockedError(f"spool {self.directory} is in use by another owner") from exc
        try:
            self._load()
        except BaseException:
            self._lock_fh.close()
            raise

    def _load(self) -> None:
        """Find the segments and the acknowledged position; start a new active segment."""
        self._ack_segment, self._ack_offset = self._read_ack()
        self._sizes: dict[int, int] = {}  # segment seq -> bytes, every segment on disk
        for path in self.directory.iterdir():
            if m := SEGMENT_NAME.match(path.name):
                self._sizes[int(m.group(1))] = path.stat().st_size
        self._delete_acknowledged(active=None)
        for seq in [s for s, size in self._sizes.items() if size == 0]:
            self._delete_segment(seq)
        # ordinals number the unacknowledged records 0, 1, ... in this object's lifetime
        self._acked_ordinal = 0
        self._next_ordinal = sum(1 for _ in self._scan(self._ack_segment, self._ack_offset))
        # a fresh segment: never append after a torn tail a crash may have left
        self._active = max([*self._sizes, self._ack_segment, 0]) + 1
        self._fd = self._open_segment(self._active)
        self._unsynced = 0
        self._last_sync = time.monotonic()
        if self._next_ordinal:
            log.info("spool %s holds %d records", self.directory, self._next_ordinal)

    # -- writing -------------------------------------------------------------------------

    def append(self, payload: bytes) -> SpoolEntry:
        """Store one record (a single line of bytes, no newline); return its position
        (``payload`` left empty), which :meth:`ack` takes."""
        (entry,) = self.append_many([payload])
        return entry

    def append_many(self, payloads: list[bytes]) -> list[SpoolEntry]:
        """Store records in order with one ``write(2)`` (while they fit the active segment);
        their positions, as :meth:`append` returns them. All or none are stored."""
        lines = [_encode(p) for p in payloads]
        with self._lock:
            self._check_open()
            total = sum(self._sizes.values())
            size_of_all = sum(map(len, lines))
            if total + size_of_all > self.max_bytes:
                raise SpoolFullError(
                    f"spool {self.directory} is full ({total} of {self.max_bytes} bytes); "
                    f"{len(lines)} records of {size_of_all} bytes refused"
                )
            if self._sizes[self._active] + size_of_all > self.segment_bytes:
                self._rotate()
            size = self._sizes[self._active]
            self._write(b"".join(lines), size)
            entries = []
            for line in lines:
                size += len(line)
                entries.append(SpoolEntry(b"", self._active, size, self._next_ordinal))
                self._next_ordinal += 1
            self._sizes[self._active] = size
            self._unsynced += len(lines)
            if self.durable and (
                self._unsynced >= self.fsync_every
                or time.monotonic() - self._last_sync >= self.fsync_interval_s
            ):
                self._sync()
            return entries

    def _write(self, data: bytes, size: int) -> None:
        """Append ``data`` to the active segment, which holds ``size`` bytes; on failure
        leave no partial line behind."""
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise SpoolError(f"writing to spool {self.directory} failed: {exc}") from exc

    def sync_if_due(self) -> None:
        """``fsync`` if records are unsynced and ``fsync_interval_s`` has passed."""
        with self._lock:
            if (
                self.durable
                and not self._closed
                and self._unsynced
                and time.monotonic() - self._last_sync >= self.fsync_interval_s
            ):
                self._sync()

    # -- reading -------------------------------------------------------------------------

    def read(self, max_records: int) -> list[SpoolEntry]:
        """Up to ``max_records`` unacknowledged records, oldest first (the spool is unchanged)."""
        with self._lock:
            self._check_open()
            entries = []
            for entry in self._scan(self._ack_segment, self._ack_offset):
                entries.append(entry)
                if len(entries) >= max_records:
                    break
            return entries

    def ack(self, entry: SpoolEntry) -> None:
        """Acknowledge ``entry`` and every record before it; delete finished segments."""
        with self._lock:
            self._check_open()
            if entry.ordinal < self._acked_ordinal:
                return  # already acknowledged
            self._ack_segment, self._ack_offset = entry.segment, entry.end_offset
            self._acked_ordinal = entry.ordinal + 1
            self._write_ack()
            caught_up = (
                entry.segment == self._active and entry.end_offset >= self._sizes[self._active]
            )
            if caught_up and self.rotate_when_caught_up:
                self._rotate()  # start afresh so the old file can go
            self._delete_acknowledged(active=self._active)

    # -- state ---------------------------------------------------------------------------

    @property
    def next_ordinal(self) -> int:
        """The ordinal the next appended record gets."""
        return self._next_ordinal

    @property
    def depth(self) -> int:
        """Records stored and not yet acknowledged."""
        return self._next_ordinal - self._acked_ordinal

    @property
    def skipped(self) -> int:
        """Torn or corrupt lines found (and skipped) since the spool was opened."""
        return len(self._bad_lines)

    @property
    def size_bytes(self) -> int:
        """Bytes of every segment on disk (acknowledged records count until deleted)."""
        with self._lock:
            return sum(self._sizes.values())

    def close(self) -> None:
        """``fsync`` and close the active segment and release the directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self.durable:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._lock_fh.close()  # releases the flock

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals (callers hold self._lock, except during __init__) ---------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.directory} is closed")

    def _sync(self) -> None:
        os.fsync(self._fd)
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def _open_segment(self, seq: int) -> int:
        fd = os.open(
            self.directory / _segment_name(seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
        self._sizes[seq] = os.fstat(fd).st_size
        if self.durable:
            _fsync_dir(self.directory)  # the new file's name survives a power loss
        return fd

    def _rotate(self) -> None:
        if self.durable:
            os.fsync(self._fd)
        os.close(self._fd)
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self._active += 1
        self._fd = self._open_segment(self._active)

    def _scan(self, from_segment: int, from_offset: int) -> Iterator[SpoolEntry]:
        """Intact records after the position, in order; torn/corrupt lines are skipped."""
        ordinal = self._acked_ordinal
        for seq in sorted(s for s in self._sizes if s >= from_segment):
            start = from_offset if seq == from_segment else 0
            end = self._sizes[seq]
            if start >= end:
                continue
            with (self.directory / _segment_name(seq)).open("rb") as fh:
                fh.seek(start)
                offset = start
                while offset < end:
                    line = fh.readline(end - offset)
                    offset += len(line)
                    payload = _decode(line)
                    if payload is None:
                        if (seq, offset) in self._bad_lines:
                            continue
                        self._bad_lines.add((seq, offset))
                        log.warning(
                            "spool %s: skipped a torn or corrupt record in %s at byte %d",
                            self.directory, _segment_name(seq), offset - len(line),
                        )  # fmt: skip
                        continue
                    yield SpoolEntry(payload, seq, offset, ordinal)
                    ordinal += 1

    def _read_ack(self) -> tuple[int, int]:
        path = self.directory / ACK_FILE
        try:
            seg, off = path.read_text().split()
            return int(seg), int(off)
        except FileNotFoundError:
            return -1, 0
        except (OSError, ValueError):
            # unreadable: replay from the start (duplicates, never a loss)
            log.warning("spool %s: unreadable %s; replaying from the start", self.directory, path)
            return -1, 0

    def _write_ack(self) -> None:
        tmp = self.directory / f"{ACK_FILE}.tmp"
        with tmp.open("w") as fh:
            fh.write(f"{self._ack_segment} {self._ack_offset}\n")
            fh.flush()
            if self.durable:
                os.fsync(fh.fileno())
        os.replace(tmp, self.directory / ACK_FILE)

    def _delete_acknowledged(self, active: int | None) -> None:
        """Delete segments entirely before the acknowledged position."""
        for seq in sorted(self._sizes):
            finished = seq < self._ack_segment or (
                seq == self._ack_segment and self._ack_offset >= self._sizes[seq]
            )
            if finished and seq != active:
                self._delete_segment(seq)

    def _delete_segment(self, seq: int) -> None:
        (self.directory / _segment_name(seq)).unlink(missing_ok=True)
        del self._sizes[seq]
