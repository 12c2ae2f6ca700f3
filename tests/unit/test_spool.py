"""The prediction log's on-disk spool: order, acknowledgement, crashes, rotation, limits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from python_backend.predlog import spool as spool_module
from python_backend.predlog.spool import Spool, SpoolFullError, SpoolLockedError

REPO_ROOT = Path(__file__).resolve().parents[2]


def rec(i: int) -> bytes:
    return b'{"request_id":"req-%04d","prediction":0.5}' % i


def payloads(spool: Spool, max_records: int = 10_000) -> list[bytes]:
    return [e.payload for e in spool.read(max_records)]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_reads_in_append_order_without_consuming(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        for i in range(10):
            spool.append(rec(i))
        assert spool.depth == 10
        assert payloads(spool, 3) == [rec(0), rec(1), rec(2)]
        assert payloads(spool) == [rec(i) for i in range(10)]  # reading does not remove


def test_ack_removes_records_and_survives_reopen(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        for i in range(10):
            spool.append(rec(i))
        entries = spool.read(4)
        spool.ack(entries[-1])
        assert spool.depth == 6
        assert payloads(spool) == [rec(i) for i in range(4, 10)]
        spool.ack(entries[1])  # acknowledging an older entry again changes nothing
        assert spool.depth == 6

    with Spool(tmp_path) as reopened:
        assert reopened.depth == 6
        assert payloads(reopened) == [rec(i) for i in range(4, 10)]
        reopened.append(rec(10))
        assert payloads(reopened) == [rec(i) for i in range(4, 11)]


def test_crash_before_ack_replays_records_again(tmp_path: Path) -> None:
    """A process that dies mid-replay loses nothing: unacknowledged records come back."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from python_backend.predlog.spool import Spool
        spool = Spool({str(tmp_path)!r}, fsync_every=1000, fsync_interval_s=3600)
        for i in range(8):
            spool.append(b'{{"request_id":"req-%04d","prediction":0.5}}' % i)
        spool.ack(spool.read(3)[-1])   # 3 delivered and acknowledged
        spool.read(5)                  # 5 more re-produced, delivery never confirmed
        os._exit(1)                    # crash: no close, no fsync
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 1, done.stderr.decode()

    with Spool(tmp_path) as spool:  # the dead process's lock is gone with it
        assert spool.depth == 5
        assert payloads(spool) == [rec(i) for i in range(3, 8)]


def test_rotation_and_deletion_of_acknowledged_segments(tmp_path: Path) -> None:
    line_bytes = len(rec(0)) + 10  # crc, space, payload, newline
    with Spool(tmp_path, segment_bytes=4 * line_bytes) as spool:
        for i in range(20):
            spool.append(rec(i))
        assert len(segments(tmp_path)) == 5
        assert spool.size_bytes == 20 * line_bytes

        entries = spool.read(10)
        spool.ack(entries[-1])  # the first two segments and half the third are done
        assert len(segments(tmp_path)) == 3
        assert payloads(spool) == [rec(i) for i in range(10, 20)]

        spool.ack(spool.read(100)[-1])
        assert spool.depth == 0
        assert spool.size_bytes == 0
        assert [p.stat().st_size for p in segments(tmp_path)] == [0]  # a fresh active segment

        spool.append(rec(20))
        assert payloads(spool) == [rec(20)]

    with Spool(tmp_path) as reopened:
        assert payloads(reopened) == [rec(20)]


def test_size_limit_refuses_records_until_acknowledged(tmp_path: Path) -> None:
    line_bytes = len(rec(0)) + 10
    with Spool(tmp_path, max_bytes=5 * line_bytes, segment_bytes=2 * line_bytes) as spool:
        for i in range(5):
            spool.append(rec(i))
        with pytest.raises(SpoolFullError, match="is full"):
            spool.append(rec(5))
        assert spool.depth == 5
        assert payloads(spool) == [rec(i) for i in range(5)]

        spool.ack(spool.read(4)[-1])
        spool.append(rec(5))
        assert payloads(spool) == [rec(4), rec(5)]


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        for i in range(3):
            spool.append(rec(i))
    [segment] = segments(tmp_path)
    with segment.open("ab") as fh:  # a write cut short by a power loss
        fh.write(b"0badc0de " + rec(3)[:17])

    with Spool(tmp_path) as spool:
        assert spool.depth == 3
        assert spool.skipped == 1
        spool.append(rec(4))  # goes to a new segment, never after the torn bytes
        assert payloads(spool) == [rec(0), rec(1), rec(2), rec(4)]
        spool.ack(spool.read(100)[-1])
        assert spool.depth == 0
    assert not segment.exists()


def test_corrupt_line_is_skipped(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        for i in range(3):
            spool.append(rec(i))
    [segment] = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    data[data.index(b"req-0001") + 5] ^= 0x01  # one flipped bit in the middle record
    segment.write_bytes(bytes(data))

    with Spool(tmp_path) as spool:
        assert payloads(spool) == [rec(0), rec(2)]
        assert spool.depth == 2
        assert spool.skipped == 1


def test_one_owner_per_directory(tmp_path: Path) -> None:
    with Spool(tmp_path), pytest.raises(SpoolLockedError):
        Spool(tmp_path)
    with Spool(tmp_path) as spool:  # released on close
        assert spool.depth == 0


def test_payload_must_be_one_line(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool, pytest.raises(ValueError, match="newline"):
        spool.append(b'{"a":\n1}')


def test_fsync_every_n_records_and_on_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path, fsync_every=5, fsync_interval_s=3600) as spool:
        synced: list[int] = []
        monkeypatch.setattr(spool_module.os, "fsync", synced.append)
        for i in range(12):
            spool.append(rec(i))
        assert len(synced) == 2  # after records 5 and 10
        spool.sync_if_due()
        assert len(synced) == 2  # interval not reached: 2 records stay unsynced

        spool.fsync_interval_s = 0.0
        spool.sync_if_due()
        assert len(synced) == 3
        spool.sync_if_due()
        assert len(synced) == 3  # nothing new to sync


def test_append_many_stores_a_batch_in_order_with_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    real_write = spool_module.os.write

    def counting_write(fd: int, data: bytes) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    with Spool(tmp_path) as spool:
        spool.append(rec(0))
        monkeypatch.setattr(spool_module.os, "write", counting_write)
        entries = spool.append_many([rec(i) for i in range(1, 6)])
        monkeypatch.undo()
        assert len(writes) == 1
        assert [e.ordinal for e in entries] == [1, 2, 3, 4, 5]
        assert payloads(spool) == [rec(i) for i in range(6)]
        spool.ack(entries[2])  # through rec(3)
        assert payloads(spool) == [rec(4), rec(5)]
    with Spool(tmp_path) as reopened:
        assert payloads(reopened) == [rec(4), rec(5)]


def test_append_many_stores_all_or_none(tmp_path: Path) -> None:
    line_bytes = len(rec(0)) + 10
    with Spool(tmp_path, max_bytes=3 * line_bytes) as spool:
        spool.append(rec(0))
        with pytest.raises(SpoolFullError):
            spool.append_many([rec(1), rec(2), rec(3)])
        with pytest.raises(ValueError, match="newline"):
            spool.append_many([rec(1), b"two\nlines"])
        assert payloads(spool) == [rec(0)]
        spool.append_many([rec(1), rec(2)])
        assert payloads(spool) == [rec(0), rec(1), rec(2)]
