"""CPU accounting of benchmark processes from /proc (Linux): how much a process or
each of its threads ran, and how long it waited for a CPU on a shared machine."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["schedstat", "proc_cpu_s", "threads_sched"]


def schedstat(path: str) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of one thread."""
    try:
        run_ns, wait_ns, _ = Path(path).read_text().split()
    except (OSError, ValueError):
        return None
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_sched(pid: int) -> dict[int, tuple[float, float]]:
    """{tid: (on-CPU s, waiting-for-CPU s)} for every thread of ``pid``."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        stat = schedstat(f"/proc/{pid}/task/{tid}/schedstat")
        if stat is not None:
            out[int(tid)] = stat
    return out
