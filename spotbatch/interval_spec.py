"""The checkpoint-interval setting as a type: ``auto``, ``<N>rows`` or ``<N>s``.

Parsed once, where the settings load, so a bad value is refused with the key named
before a worker starts; ``str()`` gives the canonical text back (logs, child workers'
environment). Kept apart from spotbatch.checkpointing so that the settings load without
the checkpoint stores (and boto3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from spotbatch.durations import DurationError, parse_duration_s

__all__ = ["IntervalSpec", "MAX_PART_ROWS"]

MAX_PART_ROWS = 1_000_000
_FORMS = "'<N>rows' (e.g. 500rows), '<N>s' (e.g. 30s) or 'auto'"
_ROWS_RE = re.compile(r"^(\d+)\s*rows?$")


@dataclass(frozen=True)
class IntervalSpec:
    kind: Literal["auto", "rows", "seconds"]
    value: float | None = None  # rows or seconds; None for auto

    @classmethod
    def parse(cls, setting: "str | IntervalSpec", max_rows: int = MAX_PART_ROWS) -> "IntervalSpec":
        """Raises ValueError naming the accepted forms."""
        if isinstance(setting, IntervalSpec):
            return setting
        text = setting.strip().lower() if isinstance(setting, str) else ""
        if text == "auto":
            return cls("auto")
        if m := _ROWS_RE.match(text):
            rows = int(m.group(1))
            if not 1 <= rows <= max_rows:
                raise ValueError(f"bad checkpoint interval {setting!r}: rows must be 1..{max_rows}; use {_FORMS}")
            return cls("rows", rows)
        try:
            seconds = parse_duration_s(text, units=("s",), bare=False)
        except DurationError:
            raise ValueError(f"bad checkpoint interval {setting!r}: use {_FORMS}") from None
        if seconds <= 0:
            raise ValueError(f"bad checkpoint interval {setting!r}: seconds must be > 0; use {_FORMS}")
        return cls("seconds", seconds)

    def __str__(self) -> str:
        if self.kind == "auto" or self.value is None:
            return "auto"
        return f"{int(self.value)}rows" if self.kind == "rows" else f"{self.value:g}s"


AUTO = IntervalSpec("auto")
