"""Recorded spot capacity: the "Can't Be Late" (NSDI '24) AWS/GCP traces as zones.

A trace file is ``{"metadata": {"gap_seconds": N}, "data": [...]}``: one reading every
N seconds (see ../shared/ref/spot-traces/README.md). How a reading is used:

- **availability** traces (a folder named ``availability``, or by default): the number
  of spot instances that could be had in the zone at that tick. A zone holds
  ``reading / nodes x replicas_per_zone`` spot replicas (rounded down); when that falls
  below what runs there, the excess is reclaimed at once (the correlated loss of a zone
  going dark). ``nodes`` is what the probe asked for: the ``N-node`` folder name, else
  the largest reading.
- **preemption** traces (a folder named ``preemption``): how many of the recorder's
  ``nodes`` instances were alive. They cap the zone the same way, and a drop from v to
  v' also interrupts (v - v') / v of the zone's running replicas, since the recorder's
  instances stand for ours.

The file's stem before the first ``_`` names the zone (``us-east-1a_v100_1.json`` ->
``us-east-1a``); when two files share a zone, the whole stem does.

A window of the simulation maps step i to the reading at ``start_s + i x step_s``. A
trace shorter than that is either looped (``fit="loop"``: it repeats from its first
reading) or the window is cut to what every trace covers (``fit="align"``: all traces
start together at ``start_s``; nothing repeats; ``common_span_s`` says how long).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

__all__ = ["SpotTrace", "SpotTraceError", "ZoneCapacity", "load_spot_trace", "load_spot_traces", "zone_capacity",
           "common_span_s", "FITS"]

FITS = ("loop", "align")
_NODES_DIR = re.compile(r"^(\d+)-node$")


class SpotTraceError(ValueError):
    """A missing or malformed spot trace; one line naming the fix."""


@dataclass(frozen=True, eq=False)
class SpotTrace:
    zone: str
    kind: Literal["availability", "preemption"]
    gap_s: float
    nodes: int  # the reading that means "everything the probe asked for"
    data: np.ndarray  # int64 readings, one per gap_s
    path: str

    @property
    def duration_s(self) -> float:
        return len(self.data) * self.gap_s

    @property
    def availability(self) -> float:
        """Mean share of the probe's instances obtainable over the whole trace."""
        return float(self.data.mean()) / self.nodes


def load_spot_traces(paths: Iterable[str | Path]) -> list[SpotTrace]:
    """Every file given; a folder stands for its ``*.json`` files (sorted)."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise SpotTraceError(f"spot trace folder {p} holds no .json files; pass trace files or a folder of them")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise SpotTraceError("no spot trace given; pass --spot-trace FILE (a JSON trace) at least once")
    traces = [load_spot_trace(f) for f in files]
    return _unique_zones(traces)


def load_spot_trace(path: str | Path) -> SpotTrace:
    p = Path(path)
    if not p.is_file():
        raise SpotTraceError(f"spot trace {p} does not exist; pass a file from ../shared/ref/spot-traces "
                             f"(availability/... or preemption/...)")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpotTraceError(f"spot trace {p} is not JSON ({exc}); pass a file like "
                             f'{{"metadata": {{"gap_seconds": 300}}, "data": [0, 1, ...]}}') from None
    gap, data = _fields(doc, p)
    parts = {part.lower() for part in p.parts}
    kind: Literal["availability", "preemption"] = "preemption" if "preemption" in parts else "availability"
    nodes = next((int(m.group(1)) for part in reversed(p.parts) if (m := _NODES_DIR.match(part))), None)
    nodes = nodes or max(1, int(data.max()))
    if int(data.max()) > nodes:
        raise SpotTraceError(f"spot trace {p} reads {int(data.max())} instances in a {nodes}-node folder; "
                             f"move it out of that folder or fix the readings")
    return SpotTrace(zone=p.stem.split("_", 1)[0], kind=kind, gap_s=gap, nodes=nodes, data=data, path=str(p))


def _fields(doc: object, p: Path) -> tuple[float, np.ndarray]:
    fix = 'it must look like {"metadata": {"gap_seconds": 300}, "data": [0, 1, ...]}'
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict) or not isinstance(doc.get("data"), list):
        raise SpotTraceError(f"spot trace {p} lacks metadata or data; {fix}")
    gap = doc["metadata"].get("gap_seconds")
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not math.isfinite(gap) or gap <= 0:
        raise SpotTraceError(f"spot trace {p}: metadata.gap_seconds must be a number > 0, got {gap!r}; {fix}")
    data = doc["data"]
    if not data or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data):
        raise SpotTraceError(f"spot trace {p}: data must be a non-empty list of integers >= 0; {fix}")
    return float(gap), np.asarray(data, dtype=np.int64)


def _unique_zones(traces: list[SpotTrace]) -> list[SpotTrace]:
    """Two files for one zone (a V100 and a K80 trace, say) keep their whole stems."""
    seen: dict[str, int] = {}
    for t in traces:
        seen[t.zone] = seen.get(t.zone, 0) + 1
    out = []
    for t in traces:
        if seen[t.zone] > 1:
            t = SpotTrace(zone=Path(t.path).stem, kind=t.kind, gap_s=t.gap_s, nodes=t.nodes, data=t.data, path=t.path)
        out.append(t)
    names = [t.zone for t in out]
    if len(set(names)) < len(names):
        raise SpotTraceError(f"spot traces name one zone twice ({', '.join(sorted(names))}); pass each file once")
    return out


def common_span_s(traces: Sequence[SpotTrace], start_s: float = 0.0) -> float:
    """Seconds every trace covers from ``start_s`` (the window ``fit="align"`` allows)."""
    return max(0.0, min(t.duration_s for t in traces) - start_s)


@dataclass(frozen=True, eq=False)
class ZoneCapacity:
    """Per step of one simulation window: the spot replicas each zone can hold, and for
    preemption traces the share of its running replicas interrupted at that step."""

    names: tuple[str, ...]
    caps: np.ndarray  # (zones, steps) int64
    kill: np.ndarray | None  # (zones, steps) float, or None when no trace is a preemption trace
    fit: str
    looped: tuple[str, ...]  # zones whose trace repeats in this window
    replicas_per_zone: tuple[int, ...]
    start_s: float

    @property
    def zones(self) -> int:
        return len(self.names)

    def subset(self, indices: Sequence[int]) -> "ZoneCapacity":
        """These zones only (in this order)."""
        idx = list(indices)
        names = tuple(self.names[i] for i in idx)
        return ZoneCapacity(names=names, caps=self.caps[idx], kill=self.kill[idx] if self.kill is not None else None,
                            fit=self.fit, looped=tuple(z for z in self.looped if z in names),
                            replicas_per_zone=tuple(self.replicas_per_zone[i] for i in idx), start_s=self.start_s)

    def availability(self) -> np.ndarray:
        """Each zone's mean capacity over the window, relative to its full size."""
        return self.caps.mean(axis=1) / np.maximum(1, np.asarray(self.replicas_per_zone))

    def describe(self) -> str:
        """One line for the report: how the traces were read."""
        repeat = f"looped: {', '.join(self.looped)}" if self.looped else "no trace repeats"
        return (f"{self.zones} zone(s) from spot traces, start {self.start_s / 86_400:g}d, fit {self.fit} "
                f"({repeat}); replicas per zone {_ranges(self.replicas_per_zone)}")


def zone_capacity(traces: Sequence[SpotTrace], *, steps: int, step_s: float, start_s: float = 0.0,
                  fit: str = "loop", replicas_per_zone: int | None = None, max_replicas: int = 100) -> ZoneCapacity:
    """The window ``[start_s, start_s + steps x step_s)`` of every trace, at step resolution.

    ``replicas_per_zone`` scales a full reading; default: a multi-node trace as recorded
    (16 nodes -> 16 replicas), a 1-node trace ``ceil(max_replicas / zones)`` (all zones up
    hold the whole fleet)."""
    if fit not in FITS:
        raise SpotTraceError(f"unknown trace fit {fit!r}; pick one of {', '.join(FITS)}")
    if not traces:
        raise SpotTraceError("no spot trace given; pass --spot-trace FILE at least once")
    end_s = start_s + steps * step_s
    if fit == "align" and end_s > min(t.duration_s for t in traces) + 1e-6:
        raise SpotTraceError(f"the window ends at {end_s / 86_400:.2f}d but the shortest trace stops at "
                             f"{min(t.duration_s for t in traces) / 86_400:.2f}d; shorten the window or use fit loop")
    t_s = start_s + np.arange(steps) * step_s
    caps, kills, per_zone, looped = [], [], [], []
    for tr in traces:
        scale = replicas_per_zone or (tr.nodes if tr.nodes > 1 else max(1, math.ceil(max_replicas / len(traces))))
        ticks = (t_s // tr.gap_s).astype(np.int64)
        if steps and ticks[-1] >= len(tr.data):
            looped.append(tr.zone)
        readings = tr.data[ticks % len(tr.data)]
        caps.append(readings * scale // tr.nodes)
        kills.append(_kill_shares(tr, ticks))
        per_zone.append(scale)
    kill = np.vstack(kills) if any(tr.kind == "preemption" for tr in traces) else None
    return ZoneCapacity(names=tuple(t.zone for t in traces), caps=np.vstack(caps).astype(np.int64), kill=kill,
                        fit=fit, looped=tuple(looped), replicas_per_zone=tuple(per_zone), start_s=start_s)


def _kill_shares(tr: SpotTrace, ticks: np.ndarray) -> np.ndarray:
    """Share of the zone's replicas a preemption trace interrupts at each step: (v - v') / v
    on the first step of a tick whose reading v' fell from v; zero elsewhere."""
    out = np.zeros(len(ticks))
    if tr.kind != "preemption" or len(ticks) < 2:
        return out
    now = tr.data[ticks % len(tr.data)].astype(float)
    before = tr.data[(ticks - 1) % len(tr.data)].astype(float)
    first = np.r_[False, ticks[1:] != ticks[:-1]]  # the step a new reading starts
    fell = first & (now < before) & (before > 0)
    out[fell] = (before[fell] - now[fell]) / before[fell]
    return out


def _ranges(values: tuple[int, ...]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}..{hi}"
