"""One deadline for a drain: every step of the shutdown asks it how long is left."""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Deadline"]


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() seconds

    @classmethod
    def within(cls, seconds: float) -> "Deadline":
        return cls(time.monotonic() + max(0.0, seconds))

    def sooner(self, other: "Deadline | None") -> "Deadline":
        return self if other is None or self.at <= other.at else other

    def left(self, reserve_s: float = 0.0) -> float:
        """Seconds until the deadline less ``reserve_s`` (kept for the steps after), >= 0."""
        return max(0.0, self.at - reserve_s - time.monotonic())

    def passed(self, reserve_s: float = 0.0) -> bool:
        return time.monotonic() >= self.at - reserve_s
