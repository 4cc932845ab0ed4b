"""An in-memory broker with the worker's broker seam, for fast unit tests of the loop.

The way dramatiq ships a StubBroker and httpx a MockTransport: the :class:`Worker`
runs against it unchanged, in one process, with no network. It keeps what the loop's
correctness depends on and nothing else:

- topics with partitions and offsets; keyed records land on a partition by key hash;
- consumer groups with eager rebalances: when a member joins or leaves, every member's
  next ``poll`` returns ``revoked`` (all it had) then ``assigned`` (its new share);
- committed offsets per group, refused (``CommitFailed``) from a member that has not
  seen the latest rebalance yet, as a real group coordinator does;
- pause / resume / seek / high watermark;
- producer acknowledgements that can be held back (``hold_acks``) or failed
  (``fail_sends_to``), to test that nothing is committed before its records are acked.

Integration tests use the real embedded broker (``spotbatch.embedded``) instead.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from kafka.structs import TopicPartition

from spotbatch.workers.broker import CommitFailed, Polled, Rebalance

__all__ = ["MemoryBroker", "MemoryRecord", "MemoryConsumer", "MemoryProducer", "SendFailed"]


class SendFailed(Exception):
    """What a send to a topic set with ``fail_sends_to`` completes with."""


@dataclass(frozen=True)
class MemoryRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: float = 0.0


class _Ack:
    """A send's outcome, shaped like kafka-python's FutureRecordMetadata."""

    def __init__(self) -> None:
        self.is_done = False
        self.exception: BaseException | None = None

    def succeeded(self) -> bool:
        return self.is_done and self.exception is None

    def _finish(self, exception: BaseException | None = None) -> None:
        self.exception, self.is_done = exception, True


@dataclass
class _Group:
    members: list[MemoryConsumer] = field(default_factory=list)
    generation: int = 0
    committed: dict[TopicPartition, int] = field(default_factory=dict)


class MemoryBroker:
    """Topics, groups and offsets in memory. Thread-safe; ``Broker`` for the worker."""

    def __init__(self, *, default_partitions: int = 1) -> None:
        self._lock = threading.RLock()
        self._logs: dict[str, list[list[MemoryRecord]]] = {}
        self._groups: dict[str, _Group] = {}
        self._default_partitions = default_partitions
        self._failing: set[str] = set()
        self._held: list[tuple[_Ack, MemoryRecord]] | None = None

    # ---- what a test does ------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> None:
        with self._lock:
            if name in self._logs:
                raise ValueError(f"topic {name!r} exists")
            self._logs[name] = [[] for _ in range(partitions)]

    def publish(self, topic: str, value: bytes | None, *, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None) -> MemoryRecord:
        with self._lock:
            log = self._log(topic)
            if partition is None:
                partition = zlib.crc32(key) % len(log) if key is not None else min(
                    range(len(log)), key=lambda p: len(log[p]))
            record = MemoryRecord(topic, partition, len(log[partition]), key, value, list(headers or []),
                                  time.time())
            log[partition].append(record)
            return record

    def records(self, topic: str) -> list[MemoryRecord]:
        """Every record of a topic, partition by partition."""
        with self._lock:
            return [r for part in self._logs.get(topic, []) for r in part]

    def committed(self, group: str, topic: str) -> dict[int, int]:
        with self._lock:
            grp = self._groups.get(group, _Group())
            return {tp.partition: off for tp, off in grp.committed.items() if tp.topic == topic}

    def log_end(self, topic: str) -> dict[int, int]:
        with self._lock:
            return {p: len(part) for p, part in enumerate(self._logs.get(topic, []))}

    def members(self, group: str) -> list[MemoryConsumer]:
        with self._lock:
            return list(self._groups.get(group, _Group()).members)

    def fail_sends_to(self, topic: str) -> None:
        """From now on, sends to ``topic`` complete with SendFailed (and store nothing)."""
        with self._lock:
            self._failing.add(topic)

    def hold_acks(self) -> None:
        """Sends are stored but stay unacknowledged until ``release_acks``."""
        with self._lock:
            self._held = self._held or []

    def release_acks(self) -> None:
        with self._lock:
            held, self._held = self._held or [], None
        for ack, _ in held:
            ack._finish()

    # ---- the seam (spotbatch.workers.broker.Broker) ----------------------------

    def consumer(self, settings: Any, client_id: str) -> MemoryConsumer:
        return MemoryConsumer(self, settings.group, client_id)

    def producer(self, settings: Any = None, client_id: str = "") -> MemoryProducer:
        return MemoryProducer(self)

    # ---- internals, called by consumers and producers --------------------------

    def _log(self, topic: str) -> list[list[MemoryRecord]]:
        if topic not in self._logs:  # auto-created, as the embedded broker does
            self._logs[topic] = [[] for _ in range(self._default_partitions)]
        return self._logs[topic]

    def _send(self, topic: str, value: bytes | None, key: bytes | None, headers: Any) -> _Ack:
        ack = _Ack()
        with self._lock:
            if topic in self._failing:
                ack._finish(SendFailed(f"send to {topic} refused (fail_sends_to)"))
                return ack
            record = self.publish(topic, value, key=key, headers=headers)
            if self._held is not None:
                self._held.append((ack, record))
                return ack
        ack._finish()
        return ack

    def _join(self, member: MemoryConsumer) -> None:
        with self._lock:
            group = self._groups.setdefault(member.group, _Group())
            group.members.append(member)
            self._rebalance(group)

    def _leave(self, member: MemoryConsumer) -> None:
        with self._lock:
            group = self._groups.get(member.group)
            if group and member in group.members:
                group.members.remove(member)
                self._rebalance(group)

    def _rebalance(self, group: _Group) -> None:
        """Eager: everyone gives everything back, then takes a round-robin share."""
        group.generation += 1
        shares: dict[int, set[TopicPartition]] = {id(m): set() for m in group.members}
        topics = sorted({m.topic for m in group.members if m.topic})
        tps = [TopicPartition(t, p) for t in topics for p in range(len(self._log(t)))]
        for i, tp in enumerate(tps):
            shares[id(group.members[i % len(group.members)])].add(tp)
        for member in group.members:
            member._reassign(shares[id(member)], group.generation)

    def _commit(self, member: MemoryConsumer, offsets: Mapping[TopicPartition, int]) -> None:
        with self._lock:
            group = self._groups[member.group]
            if member.generation != group.generation or member not in group.members:
                raise CommitFailed("the group has rebalanced since this member's last poll")
            if stray := set(offsets) - member.owned:
                raise CommitFailed(f"not assigned to this member: {sorted(stray)}")
            group.committed.update(offsets)

    def _committed_offset(self, group: str, tp: TopicPartition) -> int | None:
        with self._lock:
            return self._groups[group].committed.get(tp)


class MemoryProducer:
    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> _Ack:
        return self._broker._send(topic, value, key, headers)

    def flush(self, timeout: float | None = None) -> None:
        """Acks held back stay held: flush cannot make the broker answer."""

    def close(self, timeout: float | None = None) -> None:
        pass


class MemoryConsumer:
    """One group member. Only its owner thread calls it, like a KafkaConsumer."""

    def __init__(self, broker: MemoryBroker, group: str, client_id: str) -> None:
        self._broker = broker
        self.group, self.client_id = group, client_id
        self.topic: str | None = None
        self.owned: set[TopicPartition] = set()  # the broker's view: this generation's share
        self.generation = 0  # the last rebalance this member has seen (in poll)
        self._pending: list[tuple[set[TopicPartition], int]] = []  # rebalances not yet seen
        self._assigned: set[TopicPartition] = set()  # what the worker has been told it owns
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self.closed = False

    def subscribe(self, topic: str) -> None:
        self.topic = topic
        self._broker._join(self)

    def _reassign(self, share: set[TopicPartition], generation: int) -> None:
        """Called by the broker, under its lock."""
        self.owned = set(share)
        self._pending.append((set(share), generation))

    def poll(self, timeout_ms: int, max_records: int) -> Polled:
        polled = Polled(events=self._take_rebalances())
        with self._broker._lock:
            for tp in sorted(self._assigned - self._paused):
                log = self._broker._log(tp.topic)[tp.partition]
                start = self._positions[tp]
                batch = log[start : start + max(0, max_records - _count(polled.records))]
                if batch:
                    polled.records[tp] = list(batch)
                    self._positions[tp] = start + len(batch)
        if not polled.records and not polled.events and timeout_ms > 0:
            time.sleep(timeout_ms / 1000)  # as a real poll waits for data
        return polled

    def _take_rebalances(self) -> list[Rebalance]:
        events: list[Rebalance] = []
        with self._broker._lock:
            pending, self._pending = self._pending, []
            for share, generation in pending:
                if self._assigned:
                    events.append(Rebalance("revoked", frozenset(self._assigned)))
                self._assigned, self._paused = set(share), set()  # newly assigned start unpaused
                committed = {tp: self._broker._committed_offset(self.group, tp) for tp in share}
                self._positions = {tp: off or 0 for tp, off in committed.items()}  # earliest without a commit
                self.generation = generation
                if share:
                    events.append(Rebalance("assigned", frozenset(share), committed))
        return events

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused |= set(partitions) & self._assigned

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused -= set(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self._assigned:
            raise ValueError(f"seek on {tp}, which is not assigned")
        self._positions[tp] = offset

    def position(self, tp: TopicPartition) -> int:
        return self._positions[tp]

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._broker._commit(self, dict(offsets))

    def highwater(self, tp: TopicPartition) -> int | None:
        with self._broker._lock:
            return len(self._broker._log(tp.topic)[tp.partition])

    def close(self) -> None:
        self.closed = True
        self._broker._leave(self)


def _count(records: dict[TopicPartition, list[Any]]) -> int:
    return sum(len(recs) for recs in records.values())
