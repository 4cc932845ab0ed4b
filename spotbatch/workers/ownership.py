"""Ownership: which partitions this worker holds, and since which assignment.

Every assignment opens a new epoch. Work carries the epoch its partition had when the
work was accepted; after a revoke the partition's epoch is gone (or newer), so results
that come back for it are stale: dropped, never written, reported or committed.
"""

from __future__ import annotations

from typing import Any, Iterable

from kafka.structs import TopicPartition

__all__ = ["Ownership"]


class Ownership:
    def __init__(self) -> None:
        self._owned: dict[TopicPartition, int] = {}
        self._epoch = 0

    def take(self, tps: Iterable[TopicPartition]) -> int:
        self._epoch += 1
        self._owned.update({tp: self._epoch for tp in tps})
        return self._epoch

    def give_up(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._owned.pop(tp, None)

    def epoch_of(self, tp: TopicPartition) -> int | None:
        return self._owned.get(tp)

    def is_current(self, unit: Any) -> bool:
        """``unit`` has ``tp`` and ``epoch``: was it accepted under today's ownership?"""
        return self._owned.get(unit.tp) == unit.epoch

    @property
    def partitions(self) -> set[TopicPartition]:
        return set(self._owned)

    def __bool__(self) -> bool:
        return bool(self._owned)
