"""The broker seam: what the worker needs of Kafka, and the kafka-python adapter.

The worker owns a :class:`JobConsumer` (one thread: the owner) and a :class:`SideProducer`
(dead letters, statuses, usage records; thread-safe). :class:`KafkaBroker` makes both
with kafka-python and holds every workaround the embedded broker (Tansu) and
kafka-python 3.x need, so the loop reads as plain Kafka:

- rebalance events come back from ``poll`` as values, never as callbacks on
  kafka-python's I/O thread (no blocking calls may run there);
- a newly assigned partition is rewound to its committed offset before the worker sees
  its first record, and records fetched from before that rewind are dropped;
- the high watermark comes from fetch responses, which carry the true log end (Tansu's
  ListOffsets(latest) does not when producers batch: FACTS);
- ``close`` skips the LeaveGroup request on Tansu, where it can wedge the group.

``spotbatch.testing.MemoryBroker`` implements the same seam in memory for unit tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from spotbatch.config import Settings
from spotbatch.kafka_security import client_options
from spotbatch.retry import kafka_retry

__all__ = ["Rebalance", "Polled", "JobConsumer", "SideProducer", "SendResult", "Broker", "KafkaBroker",
           "CommitFailed"]

log = logging.getLogger("spotbatch.worker")


class CommitFailed(Exception):
    """A commit the group refused (a rebalance overtook it); the events follow."""


@dataclass(frozen=True)
class Rebalance:
    """``kind`` is ``assigned``, ``revoked`` or ``lost``. For ``assigned``,
    ``committed`` gives where each partition now starts (None: no committed offset)."""

    kind: str
    partitions: frozenset[TopicPartition]
    committed: Mapping[TopicPartition, int | None] = field(default_factory=dict)


@dataclass
class Polled:
    """One poll: the rebalances that happened first, then the records fetched after them."""

    events: list[Rebalance] = field(default_factory=list)
    records: dict[TopicPartition, list[Any]] = field(default_factory=dict)


class SendResult(Protocol):
    """kafka-python's FutureRecordMetadata, as far as the worker reads it."""

    @property
    def is_done(self) -> bool: ...
    @property
    def exception(self) -> BaseException | None: ...
    def succeeded(self) -> bool: ...


class SideProducer(Protocol):
    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> SendResult: ...
    def flush(self, timeout: float | None = None) -> None: ...


class JobConsumer(Protocol):
    """The consumer the owner thread drives. Records have ``topic``, ``partition``,
    ``offset``, ``key``, ``value`` and ``headers``, like kafka-python's."""

    def subscribe(self, topic: str) -> None: ...
    def poll(self, timeout_ms: int, max_records: int) -> Polled: ...
    def assignment(self) -> set[TopicPartition]: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]: ...
    def seek(self, tp: TopicPartition, offset: int) -> None: ...
    def position(self, tp: TopicPartition) -> int: ...
    def commit(self, offsets: Mapping[TopicPartition, int]) -> None: ...  # raises CommitFailed
    def highwater(self, tp: TopicPartition) -> int | None: ...
    def close(self) -> None: ...  # leaves the group where that is safe


class Broker(Protocol):
    def consumer(self, settings: Settings, client_id: str) -> JobConsumer: ...
    def producer(self, settings: Settings, client_id: str) -> SideProducer: ...


class KafkaBroker:
    """The real thing: kafka-python against Kafka, MSK, Redpanda or Tansu."""

    def consumer(self, settings: Settings, client_id: str) -> JobConsumer:
        return KafkaJobConsumer(settings, client_id)

    def producer(self, settings: Settings, client_id: str) -> SideProducer:
        return KafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id=f"{client_id}-side",
            acks="all",
            linger_ms=5,
            max_request_size=settings.max_partition_fetch_bytes,
            **client_options(settings),
        )


class _Listener(ConsumerRebalanceListener):
    """Runs on kafka-python's I/O thread: it only records events for the owner."""

    def __init__(self, events: list[tuple[str, set[TopicPartition]]]) -> None:
        self._events = events

    def on_partitions_revoked(self, revoked):
        self._events.append(("revoked", set(revoked)))

    def on_partitions_assigned(self, assigned):
        self._events.append(("assigned", set(assigned)))

    def on_partitions_lost(self, lost):
        self._events.append(("lost", set(lost)))


class KafkaJobConsumer:
    def __init__(self, settings: Settings, client_id: str) -> None:
        s = self._settings = settings
        self._events: list[tuple[str, set[TopicPartition]]] = []  # list.append is atomic
        self._consumer = KafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.group,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(500, s.session_timeout_ms // 5),
            max_poll_interval_ms=s.max_poll_interval_ms,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes,
            fetch_max_bytes=max(s.max_partition_fetch_bytes, 52_428_800),
            **client_options(s),
        )
        # A broker blip (connection lost, coordinator moving) must not end the worker.
        self._poll = kafka_retry(self._consumer.poll)

    def subscribe(self, topic: str) -> None:
        self._consumer.subscribe([topic], listener=_Listener(self._events))

    def poll(self, timeout_ms: int, max_records: int) -> Polled:
        before = self._take_events()  # news from a heartbeat between polls
        fetched = self._poll(timeout_ms=timeout_ms, max_records=max_records)
        during = self._take_events()  # the listener ran inside poll(): its news come first
        polled = Polled(events=before + during, records=fetched)
        for event in during:
            if event.kind == "assigned":
                self._drop_prefetched(polled, event)
        return polled

    def _take_events(self) -> list[Rebalance]:
        out = []
        while self._events:
            kind, tps = self._events.pop(0)
            committed = self._rewind(tps) if kind == "assigned" else {}
            out.append(Rebalance(kind, frozenset(tps), committed))
        return out

    def _rewind(self, tps: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Start an assigned partition at its committed offset.

        kafka-python keeps the fetch position of a partition that stays assigned across
        a rebalance, but everything the worker fetched and had not committed was
        abandoned at the revoke: without the rewind those records would be skipped, and
        the next commit would move past them. A job lost that way never comes back.
        """
        targets = {tp: self._consumer.committed(tp) for tp in tps}
        for tp, committed in targets.items():
            if committed is not None:
                self._consumer.seek(tp, committed)
        return targets

    def _drop_prefetched(self, polled: Polled, event: Rebalance) -> None:
        """Records fetched from before a rewind are read again from there next poll."""
        for tp, committed in event.committed.items():
            recs = polled.records.pop(tp, None)
            if recs and committed is None:  # no commit to rewind to: these records come first
                self._consumer.seek(tp, recs[0].offset)

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def pause(self, *partitions: TopicPartition) -> None:
        self._consumer.pause(*partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._consumer.resume(*partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._consumer.paused())

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(tp, offset)

    def position(self, tp: TopicPartition) -> int:
        return self._consumer.position(tp)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        try:
            self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
        except (CommitFailedError, KafkaError) as exc:
            raise CommitFailed(str(exc)) from exc

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._consumer.highwater(tp)

    def close(self) -> None:
        """Close the consumer, leaving the group unless that is unsafe here.

        kafka-python has no public switch for skipping LeaveGroup, so the coordinator's
        leave step is replaced for this one close. Offsets were committed before.
        """
        if not self._should_leave():
            self._consumer._coordinator.maybe_leave_group = lambda *args, **kwargs: None  # noqa: SLF001
        self._consumer.close(autocommit=False)

    def _should_leave(self) -> bool:
        if self._settings.leave_group != "auto":
            return self._settings.leave_group == "always"
        # Measured on Tansu (the embedded broker): a LeaveGroup while another member's
        # join is pending wedges the group for good; without it, the session timeout
        # removes us and the group moves on. Real Kafka handles the leave correctly.
        cluster = getattr(getattr(self._consumer, "_client", None), "cluster", None)
        return getattr(cluster, "cluster_id", None) != "tansu_cluster"
