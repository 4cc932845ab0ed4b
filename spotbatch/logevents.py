"""Structured log events: one JSON object per line, written and read back by one helper.

``event_line`` renders an event; ``parse_events`` reads every event back out of a log
(a process's stderr, a log file), whatever prefix the logging format put before it. A
JSON object cannot be broken by a value with spaces, quotes or newlines (``json.dumps``
escapes them), which a ``key=value`` line could not promise; and readers (tests, bench
scripts, a log shipper) need no regex that drifts from the writer.
"""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["event_line", "parse_events"]


def event_line(event: str, *, ts: float | None = None, **fields: Any) -> str:
    """``{"event": ..., "ts": ..., **fields}`` on one line; ``ts`` (epoch seconds) defaults
    to now. Values must be JSON-serialisable (``default=str`` keeps an odd one, e.g. a
    Path, from killing the log call)."""
    record = {"event": event, "ts": round(time.time(), 3) if ts is None else ts, **fields}
    return json.dumps(record, default=str, separators=(",", ":"))


def parse_events(text: str) -> list[dict[str, Any]]:
    """Every event in ``text``, in order: the lines whose JSON object (from the first ``{``
    to the end of the line, after any logging prefix) has an ``"event"`` key. Other lines
    (plain log messages, tracebacks, truncated writes) are skipped."""
    events = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events
