"""Workload traces for the simulator: job arrivals binned into fixed steps.

A CSV trace has one row per job (or per group of jobs arriving together)::

    at_s,rows[,jobs]          # seconds since the trace starts; rows in the job(s)
    0,100
    12.5,2500,25

Synthetic traces (seeded, Poisson arrivals of ``rows_per_job``-row jobs):

- ``steady``: a constant mean rate.
- ``diurnal``: the rate follows a day: ``mean x (1 + amplitude x sin)`` peaking at 14:00.
- ``bursty``: a low floor plus seeded bursts (``bursts_per_day``), each dumping about
  ``burst_h`` hours of the mean rate at once; the mean over the trace stays ``mean``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from spotbatch.durations import parse_duration_s  # re-exported: the simulator's flags and bench/ use it here

__all__ = ["Trace", "TraceError", "load_csv", "synthetic", "SYNTHETIC_KINDS", "parse_duration_s"]

SYNTHETIC_KINDS = ("steady", "diurnal", "bursty")
_DAY_S = 86_400.0


class TraceError(ValueError):
    """A bad trace file or generator argument; one line naming the fix."""


@dataclass(frozen=True)
class Trace:
    """Arrivals per step: ``jobs[i]`` jobs holding ``rows[i]`` rows arrive in step i."""

    step_s: float
    jobs: np.ndarray  # int64
    rows: np.ndarray  # int64
    name: str = "trace"

    @property
    def steps(self) -> int:
        return len(self.rows)

    @property
    def duration_s(self) -> float:
        return self.steps * self.step_s

    @property
    def rows_per_job(self) -> float:
        """Mean rows per job (the scaler counts lag in messages, i.e. jobs)."""
        total_jobs = int(self.jobs.sum())
        return float(self.rows.sum()) / total_jobs if total_jobs else 1.0


def load_csv(path: str | Path, *, step_s: float, duration_s: float | None = None) -> Trace:
    """Bin a CSV trace (see the module docstring) into steps of ``step_s``."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"trace file {p} does not exist; pass a CSV with columns at_s,rows[,jobs]")
    at, rows, jobs = _read_columns(p)
    steps = max(1, math.ceil(duration_s / step_s) if duration_s is not None else int(max(at, default=0.0) // step_s) + 1)
    idx = np.minimum((np.asarray(at) // step_s).astype(np.int64), steps - 1)
    return Trace(step_s=step_s, name=p.name,
                 jobs=np.bincount(idx, weights=np.asarray(jobs), minlength=steps).astype(np.int64),
                 rows=np.bincount(idx, weights=np.asarray(rows), minlength=steps).astype(np.int64))


def _read_columns(p: Path) -> tuple[list[float], list[int], list[int]]:
    at: list[float] = []
    rows: list[int] = []
    jobs: list[int] = []
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"at_s", "rows"} <= set(reader.fieldnames):
            raise TraceError(f"trace file {p} needs a header with at_s,rows (and optionally jobs); got {reader.fieldnames}")
        for line_no, rec in enumerate(reader, start=2):
            try:
                a, r, j = float(rec["at_s"]), int(rec["rows"]), int(rec.get("jobs") or 1)
            except (TypeError, ValueError):
                raise TraceError(f"trace file {p} line {line_no}: at_s must be a number and rows/jobs integers") from None
            if a < 0 or r < 0 or j < 1:
                raise TraceError(f"trace file {p} line {line_no}: at_s and rows must be >= 0 and jobs >= 1")
            at.append(a)
            rows.append(r)
            jobs.append(j)
    return at, rows, jobs


def synthetic(kind: Literal["steady", "diurnal", "bursty"], *, days: float, step_s: float, seed: int,
              mean_rows_per_s: float, rows_per_job: int = 100, amplitude: float = 0.8,
              bursts_per_day: float = 2.0, burst_h: float = 2.0, poisson: bool = True) -> Trace:
    """A seeded synthetic trace (see the module docstring). ``poisson=False`` gives the
    expected job counts rounded, for closed-form checks."""
    if kind not in SYNTHETIC_KINDS:
        raise TraceError(f"unknown synthetic trace {kind!r}; pick one of {', '.join(SYNTHETIC_KINDS)}")
    if days <= 0 or step_s <= 0 or mean_rows_per_s < 0 or rows_per_job < 1:
        raise TraceError("synthetic trace needs days > 0, step > 0, mean rows/s >= 0 and rows per job >= 1")
    rng = np.random.default_rng([seed, 0x7ACE])
    steps = max(1, math.ceil(days * _DAY_S / step_s))
    t = np.arange(steps) * step_s
    jobs_per_step = mean_rows_per_s * step_s / rows_per_job
    if kind == "steady":
        rate = np.full(steps, jobs_per_step)
    elif kind == "diurnal":
        amplitude = min(max(amplitude, 0.0), 1.0)
        rate = jobs_per_step * (1 + amplitude * np.sin(2 * np.pi * (t / _DAY_S - 8 / 24)))  # peak at 14:00
    else:
        rate = _bursty(rng, steps, step_s, jobs_per_step, bursts_per_day=bursts_per_day, burst_h=burst_h)
    jobs = rng.poisson(rate) if poisson else np.rint(rate)
    jobs = jobs.astype(np.int64)
    return Trace(step_s=step_s, jobs=jobs, rows=jobs * rows_per_job, name=f"{kind} {days:g}d")


def _bursty(rng: np.random.Generator, steps: int, step_s: float, jobs_per_step: float, *,
            bursts_per_day: float, burst_h: float) -> np.ndarray:
    n_bursts = rng.poisson(bursts_per_day * steps * step_s / _DAY_S)
    burst_jobs = jobs_per_step * burst_h * 3600 / step_s
    floor = max(0.0, jobs_per_step - n_bursts * burst_jobs / steps)
    rate = np.full(steps, floor)
    np.add.at(rate, rng.integers(0, steps, size=n_bursts), burst_jobs)
    return rate
