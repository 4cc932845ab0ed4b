"""The autoscaler's observer: a consumer group's backlog on one topic, from the broker."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spotbatch.kafka_admin import OffsetReader
from spotbatch.scaler.lag import LagOptions, compute_lag, read_offsets

__all__ = ["Backlog", "GroupBacklog"]


@dataclass(frozen=True)
class Backlog:
    """What an observer reads from the broker for one poll."""

    lag: int  # KEDA's metric lag (capped as KEDA caps it)
    unconsumed: Mapping[int, int]  # partition -> records not yet committed
    partitions: int
    active: bool = False  # KEDA's activation


class GroupBacklog:
    """The observer: a consumer group's backlog on one topic, measured by
    ``spotbatch.scaler.lag`` over one long-lived offset reader.

    Lag uses offsetResetPolicy ``earliest``, as the workers do (``auto_offset_reset``):
    a partition without a commit counts its whole log, which is what is unconsumed.
    """

    def __init__(self, bootstrap: str, group: str, topic: str, *, lag_threshold: int, reader: Any = None,
                 client_options: Mapping | None = None) -> None:
        self._group, self._topic = group, topic
        self._options = LagOptions(lag_threshold=lag_threshold, offset_reset_policy="earliest")
        self._reader = reader or OffsetReader(bootstrap, client_options=client_options)

    def __call__(self) -> Backlog:
        committed, ends = read_offsets(self._reader, self._group, self._topic)
        result = compute_lag(committed, ends, self._options)
        return Backlog(lag=result.total_lag, partitions=result.partition_count, active=result.active,
                       unconsumed={p.partition: p.lag_with_persistent for p in result.partitions})

    def close(self) -> None:
        self._reader.close()
