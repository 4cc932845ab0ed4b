"""Consumer-group lag with the exact semantics of KEDA's ``kafka`` trigger.

The rules (ref/FACTS.md, KEDA pkg/scalers/kafka_scaler.go) live in pure functions over
offset maps keyed by ``(topic, partition)``:

- ``partition_lag``: one partition's lag from its committed and log-end offsets;
- ``compute_lag``: the group's total (the metric KEDA serves) with the partition cap,
  ``limitToPartitionsWithLag``, ``ensureEvenDistributionOfPartitions`` and
  ``excludePersistentLag``, and whether the trigger is active.

``read_offsets`` is the one I/O step: committed offsets of a group and the *true* log
ends (kafka_admin works around Tansu's ListOffsets answer for multi-record batches).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

__all__ = [
    "TopicPartitionKey",
    "LagOptions",
    "PartitionLag",
    "LagResult",
    "LagError",
    "NO_COMMIT",
    "partition_lag",
    "compute_lag",
    "read_offsets",
]

TopicPartitionKey = tuple[str, int]  # (topic, partition)
NO_COMMIT = -1  # Kafka's "no committed offset" (KEDA's invalidOffset)


class LagError(ValueError):
    """Bad options, or a group/topic that cannot be measured; one line with the fix."""


@dataclass(frozen=True, kw_only=True)
class LagOptions:
    """The ``kafka`` trigger's lag settings, KEDA's defaults and validation."""

    lag_threshold: int = 10
    activation_lag_threshold: int = 0
    offset_reset_policy: Literal["latest", "earliest"] = "latest"
    allow_idle_consumers: bool = False
    exclude_persistent_lag: bool = False
    scale_to_zero_on_invalid_offset: bool = False
    limit_to_partitions_with_lag: bool = False
    ensure_even_distribution_of_partitions: bool = False

    def __post_init__(self) -> None:
        if self.lag_threshold <= 0:
            raise LagError(f"lagThreshold must be > 0, got {self.lag_threshold}")
        if self.activation_lag_threshold < 0:
            raise LagError(f"activationLagThreshold must be >= 0, got {self.activation_lag_threshold}")
        if self.offset_reset_policy not in ("latest", "earliest"):
            raise LagError(f"offsetResetPolicy must be latest or earliest, got {self.offset_reset_policy!r}")
        # KEDA refuses both combinations: each asks for the opposite of the other.
        if self.allow_idle_consumers and self.limit_to_partitions_with_lag:
            raise LagError("allowIdleConsumers and limitToPartitionsWithLag cannot both be true; drop one")
        if self.allow_idle_consumers and self.ensure_even_distribution_of_partitions:
            raise LagError("allowIdleConsumers and ensureEvenDistributionOfPartitions cannot both be true; drop one")


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int  # NO_COMMIT (-1) when the group has none
    log_end: int
    lag: int  # what counts for the metric
    lag_with_persistent: int  # what counts for activation


@dataclass(frozen=True)
class LagResult:
    partitions: tuple[PartitionLag, ...]
    total_lag: int  # the metric KEDA serves (after the cap / even distribution)
    total_lag_with_persistent: int  # before the cap, persistent lag included
    partition_count: int
    partitions_with_lag: int
    active: bool  # total_lag_with_persistent > activation_lag_threshold
    # Committed offsets remembered for excludePersistentLag: pass to the next poll.
    previous: Mapping[TopicPartitionKey, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("previous")
        data["partitions"] = [asdict(p) for p in self.partitions]
        return data


def partition_lag(committed: int, log_end: int, options: LagOptions,
                  previous: int | None = None) -> tuple[int, int]:
    """(lag for the metric, lag for activation) of one partition: FACTS.md's table.

    ``previous``: the committed offset seen on the previous poll (excludePersistentLag).
    """
    if committed < 0:
        if options.scale_to_zero_on_invalid_offset:
            return 0, 0
        lag = 1 if options.offset_reset_policy == "latest" else log_end
        return lag, lag
    lag = log_end - committed
    if options.exclude_persistent_lag and previous is not None and previous == committed:
        return 0, lag  # stuck on the same offset: maybe a poison record; not a reason to scale
    return lag, lag


def compute_lag(committed: Mapping[TopicPartitionKey, int],
                log_ends: Mapping[TopicPartitionKey, int],
                options: LagOptions,
                previous: Mapping[TopicPartitionKey, int] | None = None) -> LagResult:
    """The group's lag over the partitions in ``log_ends`` (KEDA's getTotalLag).

    A partition missing from ``log_ends`` counts 0 (it is not iterated, as in KEDA); one
    missing from ``committed`` has no commit.
    """
    previous = previous or {}
    remembered: dict[TopicPartitionKey, int] = dict(previous)
    rows = []
    for key in sorted(log_ends):
        offset = committed.get(key, NO_COMMIT)
        lag, lag_all = partition_lag(offset, log_ends[key], options, previous.get(key))
        if options.exclude_persistent_lag and offset >= 0:
            remembered[key] = offset
        rows.append(PartitionLag(key[0], key[1], offset, log_ends[key], lag, lag_all))
    total = sum(p.lag for p in rows)
    with_persistent = sum(p.lag_with_persistent for p in rows)
    with_lag = sum(1 for p in rows if p.lag > 0)
    capped = _cap(total, len(rows), with_lag, options)
    return LagResult(partitions=tuple(rows), total_lag=capped, total_lag_with_persistent=with_persistent,
                     partition_count=len(rows), partitions_with_lag=with_lag,
                     active=with_persistent > options.activation_lag_threshold, previous=remembered)


def _cap(total: int, partitions: int, with_lag: int, options: LagOptions) -> int:
    threshold = options.lag_threshold
    if not options.allow_idle_consumers or options.limit_to_partitions_with_lag:
        # No more consumers than partitions (or than partitions with lag) can work.
        bound = with_lag if options.limit_to_partitions_with_lag else partitions
        if total // threshold > bound:  # Go's integer division (truncates toward zero)
            total = bound * threshold
    if options.ensure_even_distribution_of_partitions:
        total = _next_even_factor(total, partitions, threshold) * threshold
    return total


def _next_even_factor(total: int, partitions: int, threshold: int) -> int:
    """The smallest factor f of the partition count with f x threshold >= total."""
    for f in range(1, partitions + 1):
        if partitions % f == 0 and f * threshold >= total:
            return f
    return partitions


def read_offsets(reader, group: str, topic: str | None = None
                 ) -> tuple[dict[TopicPartitionKey, int], dict[TopicPartitionKey, int]]:
    """(committed, true log ends) of ``group``; ``reader`` is a kafka_admin.OffsetReader.

    Without ``topic``, every topic the group has committed offsets for counts (KEDA).
    Raises LagError when there is nothing to measure.
    """
    from kafka.errors import UnknownTopicOrPartitionError

    committed = reader.group_committed(group)
    if topic is None:
        topics = sorted({t for (t, _), offset in committed.items() if offset >= 0})
        if not topics:
            raise LagError(f"group {group!r} has no committed offsets on {reader.bootstrap}; "
                           "pass the topic it consumes (--topic / metadata topic)")
    else:
        topics = [topic]
    try:
        ends = reader.log_ends(topics)
    except UnknownTopicOrPartitionError:
        raise LagError(f"topic {', '.join(topics)} does not exist on {reader.bootstrap}; "
                       "check the topic name and --bootstrap") from None
    return {k: v for k, v in committed.items() if k[0] in topics}, ends
