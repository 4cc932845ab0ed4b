"""The recent records of the usage topic, read incrementally without a consumer group.

The scaler learns rows/s per replica from them and the pool splitter the spot
interruption rate: both keep a window of records, de-duplicated by record_id (a
redelivered record counts once), and read only what was appended since the last call.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

__all__ = ["UsageTail"]

T = TypeVar("T")


class UsageTail(Generic[T]):
    """``items()`` reads the records appended since the last call (through a
    kafka_admin.OffsetReader), keeps those ``parse`` accepts, and drops the ones that
    ended before the window; at most ``max_items``, the oldest go first."""

    def __init__(self, reader, topic: str, *, parse: Callable[[bytes | None], T | None],
                 record_id: Callable[[T], str], end: Callable[[T], float], window_s: float,
                 clock: Callable[[], float] = time.time, max_items: int = 100_000) -> None:
        self._reader = reader
        self._topic = topic
        self._parse, self._record_id, self._end = parse, record_id, end
        self._window_s = window_s
        self._clock = clock
        self._max = max_items
        self._items: OrderedDict[str, T] = OrderedDict()
        self._next: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def items(self) -> list[T]:
        with self._lock:
            self._poll()
            return list(self._items.values())

    def _poll(self) -> None:
        from kafka.errors import UnknownTopicOrPartitionError

        try:
            ends = self._reader.log_ends([self._topic])
        except UnknownTopicOrPartitionError:
            return  # no worker has reported yet
        ranges = {tp: (self._next.get(tp, 0), end) for tp, end in ends.items()}
        for record in self._reader.read_ranges(ranges):
            item = self._parse(record.value)
            if item is not None:
                self._items[self._record_id(item)] = item  # same record_id: counted once
        self._next.update({tp: end for tp, (_, end) in ranges.items()})
        horizon = self._clock() - self._window_s
        for rid in [rid for rid, item in self._items.items() if self._end(item) < horizon]:
            del self._items[rid]
        while len(self._items) > self._max:
            self._items.popitem(last=False)
