"""Which offsets are safe to commit.

A record's offset is "outstanding" from the moment it is fetched until its job is
durable (output written, or the job dead-lettered and the DLQ write acknowledged).
The committable position of a partition is its lowest outstanding offset, or one
past the highest offset seen when nothing is outstanding: Kafka commits a position,
so a job finished out of order waits for every job before it.
"""

from __future__ import annotations

from kafka.structs import OffsetAndMetadata, TopicPartition

__all__ = ["OffsetTracker"]


class OffsetTracker:
    def __init__(self) -> None:
        self._outstanding: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def seen(self, tp: TopicPartition, offset: int) -> None:
        self._outstanding.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TopicPartition, offset: int) -> None:
        self._outstanding.get(tp, set()).discard(offset)

    def forget(self, tp: TopicPartition) -> None:
        """Drop a revoked or lost partition: nothing of it may be committed by us again."""
        self._outstanding.pop(tp, None)
        self._next.pop(tp, None)
        self._committed.pop(tp, None)

    def position(self, tp: TopicPartition) -> int | None:
        if tp not in self._next:
            return None
        pending = self._outstanding.get(tp)
        return min(pending) if pending else self._next[tp]

    def to_commit(self, only: set[TopicPartition] | None = None) -> dict[TopicPartition, OffsetAndMetadata]:
        """Positions that moved since the last commit, ready for consumer.commit()."""
        out = {}
        for tp in self._next:
            pos = self.position(tp)
            if (only is None or tp in only) and pos is not None and pos > self._committed.get(tp, -1):
                out[tp] = OffsetAndMetadata(pos, "", -1)
        return out

    def committed(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        for tp, meta in offsets.items():
            if tp in self._next:
                self._committed[tp] = meta.offset

    def outstanding(self) -> int:
        return sum(len(s) for s in self._outstanding.values())
