"""Commit positions with several messages of a partition in flight."""

from __future__ import annotations

import pytest

from gateway.asyncpred.offsets import CommitTracker

P0, P1 = ("inference-requests", 0), ("inference-requests", 1)


def test_only_the_contiguous_finished_prefix_is_committable() -> None:
    t = CommitTracker()
    t.assign([P0])
    tickets = [t.take(P0, o) for o in (10, 11, 12, 13)]
    assert t.committable() == {P0: 10}  # nothing finished: position stays at the first
    t.committed({P0: 10})
    assert t.committable() == {}
    t.finish(tickets[2])
    t.finish(tickets[1])
    assert t.committable() == {}  # 10 still running: 11 and 12 must not be committed
    t.finish(tickets[0])
    assert t.committable() == {P0: 13}
    t.committed({P0: 13})
    t.finish(tickets[3])
    assert t.committable() == {P0: 14}
    assert t.in_flight() == 0


def test_gaps_in_offsets_do_not_block_commits() -> None:
    t = CommitTracker()
    t.assign([P0])
    a, b = t.take(P0, 5), t.take(P0, 9)  # 6..8: e.g. transaction markers
    t.finish(b)
    assert t.committable() == {P0: 5}
    t.finish(a)
    assert t.committable() == {P0: 10}


def test_partitions_are_independent() -> None:
    t = CommitTracker()
    t.assign([P0, P1])
    assert sorted(t.partitions()) == [P0, P1]
    a = t.take(P0, 0)
    b = t.take(P1, 100)
    t.finish(b)
    assert t.committable() == {P0: 0, P1: 101}
    assert t.committable([P1]) == {P1: 101}
    t.finish(a)
    assert t.committable([P0]) == {P0: 1}


def test_messages_of_a_revoked_generation_do_not_count() -> None:
    t = CommitTracker()
    t.assign([P0])
    old = t.take(P0, 7)
    t.revoke([P0])
    assert t.finish(old) is False
    assert t.committable() == {}
    t.assign([P0])  # the partition comes back; 7 is delivered again
    again = t.take(P0, 7)
    assert t.finish(old) is False  # the first copy finishing moves nothing
    assert t.committable() == {P0: 7}
    assert t.finish(again) is True
    assert t.committable() == {P0: 8}


def test_offsets_must_increase_within_a_partition() -> None:
    t = CommitTracker()
    t.take(P0, 3)
    with pytest.raises(ValueError):
        t.take(P0, 2)


def test_committed_never_moves_back() -> None:
    t = CommitTracker()
    t.finish(t.take(P0, 0))
    t.committed({P0: 1})
    t.committed({P0: 0})
    assert t.committable() == {}
