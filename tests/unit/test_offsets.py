"""OffsetTracker: commit the lowest outstanding offset, never twice, per partition."""

from __future__ import annotations

from kafka.structs import OffsetAndMetadata, TopicPartition

from spotbatch.workers.offsets import OffsetTracker

TP0 = TopicPartition("jobs", 0)
TP1 = TopicPartition("jobs", 1)
TP2 = TopicPartition("other", 0)


def _positions(offsets: dict) -> dict:
    return {tp: meta.offset for tp, meta in offsets.items()}


def test_unknown_partition_has_no_position():
    t = OffsetTracker()
    assert t.position(TP0) is None
    assert t.to_commit() == {}
    assert t.outstanding() == 0


def test_out_of_order_completion_holds_at_lowest_outstanding():
    t = OffsetTracker()
    for off in range(10, 15):
        t.seen(TP0, off)
    assert t.outstanding() == 5
    assert t.position(TP0) == 10

    t.done(TP0, 12)
    t.done(TP0, 13)
    assert t.position(TP0) == 10  # 10 and 11 still outstanding
    t.done(TP0, 11)
    assert t.position(TP0) == 10
    t.done(TP0, 10)
    assert t.position(TP0) == 14  # next outstanding
    t.done(TP0, 14)
    assert t.position(TP0) == 15  # nothing outstanding: one past the highest seen
    assert t.outstanding() == 0


def test_commit_offsets_are_kafka_positions():
    t = OffsetTracker()
    t.seen(TP0, 7)
    t.done(TP0, 7)
    offsets = t.to_commit()
    assert list(offsets) == [TP0]
    meta = offsets[TP0]
    assert isinstance(meta, OffsetAndMetadata)
    assert meta.offset == 8 and meta.metadata == ""


def test_nothing_is_committed_twice():
    t = OffsetTracker()
    for off in range(3):
        t.seen(TP0, off)
    t.done(TP0, 0)
    first = t.to_commit()
    assert _positions(first) == {TP0: 1}
    t.committed(first)
    assert t.to_commit() == {}

    t.done(TP0, 2)  # out of order: position still 1, already committed
    assert t.to_commit() == {}
    t.done(TP0, 1)
    second = t.to_commit()
    assert _positions(second) == {TP0: 3}
    t.committed(second)
    assert t.to_commit() == {}
    t.done(TP0, 1)  # a duplicate completion changes nothing
    assert t.to_commit() == {}


def test_uncommitted_positions_are_offered_again():
    t = OffsetTracker()
    t.seen(TP0, 0)
    t.done(TP0, 0)
    assert _positions(t.to_commit()) == {TP0: 1}
    # The commit failed, so committed() was never called: offer it again.
    assert _positions(t.to_commit()) == {TP0: 1}


def test_redelivered_lower_offset_holds_the_position_back():
    t = OffsetTracker()
    t.seen(TP0, 5)
    t.done(TP0, 5)
    t.committed(t.to_commit())
    t.seen(TP0, 5)  # redelivered after a rebalance
    assert t.position(TP0) == 5
    assert t.to_commit() == {}  # 5 < committed 6: never move a commit backwards


def test_partitions_are_independent():
    t = OffsetTracker()
    t.seen(TP0, 0)
    t.seen(TP0, 1)
    t.seen(TP1, 100)
    t.done(TP0, 1)
    t.done(TP1, 100)
    assert _positions(t.to_commit()) == {TP0: 0, TP1: 101}
    assert t.outstanding() == 1


def test_forget_drops_a_partition():
    t = OffsetTracker()
    t.seen(TP0, 0)
    t.seen(TP1, 0)
    t.done(TP1, 0)
    t.committed({TP0: OffsetAndMetadata(0, "", -1)})
    t.forget(TP0)
    assert t.position(TP0) is None
    assert t.outstanding() == 0
    assert _positions(t.to_commit()) == {TP1: 1}
    # A late completion or commit ack for the forgotten partition must not revive it.
    t.done(TP0, 0)
    t.committed({TP0: OffsetAndMetadata(1, "", -1)})
    assert TP0 not in t.to_commit()
    assert t.position(TP0) is None


def test_forget_then_reassign_starts_fresh():
    t = OffsetTracker()
    t.seen(TP0, 10)
    t.done(TP0, 10)
    t.committed(t.to_commit())
    t.forget(TP0)
    t.seen(TP0, 4)  # another owner committed lower; we start from the fetch position
    t.done(TP0, 4)
    assert _positions(t.to_commit()) == {TP0: 5}


def test_forget_unknown_partition_is_harmless():
    t = OffsetTracker()
    t.forget(TP2)
    assert t.to_commit() == {}


def test_to_commit_only_filters():
    t = OffsetTracker()
    for tp in (TP0, TP1, TP2):
        t.seen(tp, 3)
        t.done(tp, 3)
    assert _positions(t.to_commit(only={TP1})) == {TP1: 4}
    assert _positions(t.to_commit(only={TP0, TP2})) == {TP0: 4, TP2: 4}
    assert t.to_commit(only=set()) == {}
    assert t.to_commit(only={TopicPartition("jobs", 9)}) == {}
    assert _positions(t.to_commit()) == {TP0: 4, TP1: 4, TP2: 4}
