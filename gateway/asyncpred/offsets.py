"""Which Kafka offsets a worker may commit while it processes several messages at once.

Messages of one partition finish out of order; committing offset ``n`` tells Kafka that
everything before ``n`` is done. So per partition the commit position is the lowest offset
still in flight, or one past the highest offset taken when nothing is in flight: a finished
message behind an unfinished one is not committed until the earlier one finishes (a crash
then redelivers both; processing is idempotent).

Each assignment of a partition is a *generation*: a revoked partition's state is dropped,
and messages still running from an earlier generation cannot move the position of a later
one. Thread-safe: rebalance callbacks run on the consumer's thread, completions on the loop.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

#: (topic, partition)
Partition = tuple[str, int]


@dataclass(frozen=True)
class Ticket:
    """One message taken for processing; hand it back to :meth:`CommitTracker.finish`."""

    partition: Partition
    offset: int
    generation: int


@dataclass
class _PartitionState:
    generation: int
    in_flight: collections.deque[int] = field(default_factory=collections.deque)
    finished: set[int] = field(default_factory=set)
    #: next offset after the last one taken; None until a message was taken
    next_offset: int | None = None
    committed: int | None = None

    def position(self) -> int | None:
        return self.in_flight[0] if self.in_flight else self.next_offset


class CommitTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[Partition, _PartitionState] = {}
        self._generation = 0

    def assign(self, partitions: list[Partition]) -> None:
        """Start tracking newly assigned partitions (a new generation each)."""
        with self._lock:
            for p in partitions:
                self._generation += 1
                self._partitions[p] = _PartitionState(self._generation)

    def revoke(self, partitions: list[Partition]) -> None:
        """Forget revoked or lost partitions; their running messages no longer count."""
        with self._lock:
            for p in partitions:
                self._partitions.pop(p, None)

    def take(self, partition: Partition, offset: int) -> Ticket:
        """A message starts processing. Offsets of a partition are taken in increasing order."""
        with self._lock:
            state = self._partitions.get(partition)
            if state is None:  # not seen in an assignment callback: track it from here
                self._generation += 1
                state = self._partitions[partition] = _PartitionState(self._generation)
            if state.next_offset is not None and offset < state.next_offset:
                raise ValueError(
                    f"offset {offset} of {partition} taken after {state.next_offset - 1}"
                )
            state.in_flight.append(offset)
            state.next_offset = offset + 1
            return Ticket(partition, offset, state.generation)

    def finish(self, ticket: Ticket) -> bool:
        """The message is done; False if its partition was revoked (or reassigned) since."""
        with self._lock:
            state = self._partitions.get(ticket.partition)
            if state is None or state.generation != ticket.generation:
                return False
            state.finished.add(ticket.offset)
            while state.in_flight and state.in_flight[0] in state.finished:
                state.finished.discard(state.in_flight.popleft())
            return True

    def committable(self, partitions: list[Partition] | None = None) -> dict[Partition, int]:
        """Commit positions that moved since the last :meth:`committed` (all partitions or some)."""
        with self._lock:
            out: dict[Partition, int] = {}
            for p, state in self._partitions.items():
                if partitions is not None and p not in partitions:
                    continue
                position = state.position()
                if position is not None and position != state.committed:
                    out[p] = position
            return out

    def committed(self, positions: dict[Partition, int]) -> None:
        """Kafka accepted these commit positions."""
        with self._lock:
            for p, position in positions.items():
                state = self._partitions.get(p)
                if state is not None and (state.committed is None or position > state.committed):
                    state.committed = position

    def partitions(self) -> list[Partition]:
        """The partitions currently tracked (assigned)."""
        with self._lock:
            return list(self._partitions)

    def in_flight(self) -> int:
        with self._lock:
            return sum(len(s.in_flight) for s in self._partitions.values())
