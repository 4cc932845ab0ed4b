"""How much work to do between checkpoints.

Young's approximation: with checkpoint cost C and mean time between interruptions M,
checkpointing every tau = sqrt(2 C M) seconds minimises the wasted fraction
C/tau + tau/(2M) (time spent checkpointing plus work lost to the average interruption).
C = 2 s and M = 6 h give tau ~ 294 s.

The worker cuts jobs into parts and checkpoints after each, so the policy answers in
rows: ``CheckpointInterval("500rows" | "30s" | "auto").rows(rows_per_s)``.
"""

from __future__ import annotations

import math

from spotbatch.interval_spec import MAX_PART_ROWS, IntervalSpec

__all__ = ["young_interval_s", "wasted_fraction", "CheckpointInterval", "DEFAULT_MTBI_S", "MAX_PART_ROWS"]

DEFAULT_MTBI_S = 6 * 3600.0


def young_interval_s(checkpoint_cost_s: float, mtbi_s: float) -> float:
    """Young's optimal seconds between checkpoints: sqrt(2 C M)."""
    if checkpoint_cost_s < 0 or mtbi_s <= 0:
        raise ValueError(f"need checkpoint_cost_s >= 0 and mtbi_s > 0, got {checkpoint_cost_s}, {mtbi_s}")
    return math.sqrt(2.0 * checkpoint_cost_s * mtbi_s)


def wasted_fraction(tau_s: float, checkpoint_cost_s: float, mtbi_s: float) -> float:
    """Fraction of time lost at interval tau: C/tau (checkpointing) + tau/(2M) (rework)."""
    if tau_s <= 0 or mtbi_s <= 0:
        raise ValueError(f"need tau_s > 0 and mtbi_s > 0, got {tau_s}, {mtbi_s}")
    return checkpoint_cost_s / tau_s + tau_s / (2.0 * mtbi_s)


class CheckpointInterval:
    """Parse the interval setting and turn it into a part size in rows.

    ``auto`` uses Young's interval from an EWMA of measured checkpoint costs
    (:meth:`observe_cost`) and the mean time between interruptions: ``mtbi_s`` until
    gaps are observed (:meth:`observe_interruption_gap`), then their mean. Until a
    cost has been measured it answers one batch, so the first checkpoint comes soon
    and is measured. Seconds-based answers are clamped to [batch_rows, max_rows].
    """

    def __init__(self, setting: str | IntervalSpec, *, batch_rows: int = 1, mtbi_s: float = DEFAULT_MTBI_S,
                 max_rows: int = MAX_PART_ROWS, cost_alpha: float = 0.3) -> None:
        if not 1 <= batch_rows <= max_rows:
            raise ValueError(f"need 1 <= batch_rows <= max_rows, got {batch_rows}, {max_rows}")
        if mtbi_s <= 0 or not 0 < cost_alpha <= 1:
            raise ValueError(f"need mtbi_s > 0 and 0 < cost_alpha <= 1, got {mtbi_s}, {cost_alpha}")
        spec = IntervalSpec.parse(setting, max_rows)
        self.kind, self.value = spec.kind, spec.value
        self.batch_rows, self.max_rows = batch_rows, max_rows
        self.cost_alpha = cost_alpha
        self.cost_s: float | None = None  # EWMA of measured checkpoint cost
        self._configured_mtbi_s = mtbi_s
        self._gap_count, self._gap_sum = 0, 0.0

    def observe_cost(self, seconds: float) -> None:
        """Feed one measured checkpoint duration (save + anything it waited on)."""
        if seconds < 0:
            raise ValueError(f"checkpoint cost must be >= 0, got {seconds}")
        # EWMA: follows a store that gets slower without jumping on one slow save.
        a = self.cost_alpha
        self.cost_s = seconds if self.cost_s is None else a * seconds + (1 - a) * self.cost_s

    def observe_interruption_gap(self, seconds: float) -> None:
        """Feed one observed time between interruptions (e.g. from attempt history)."""
        if seconds <= 0:
            raise ValueError(f"interruption gap must be > 0, got {seconds}")
        self._gap_count += 1
        self._gap_sum += seconds

    @property
    def mtbi_s(self) -> float:
        return self._gap_sum / self._gap_count if self._gap_count else self._configured_mtbi_s

    def interval_s(self) -> float | None:
        """Seconds between checkpoints, or None where it is set in rows or not yet known."""
        if self.kind == "seconds":
            return self.value
        if self.kind == "auto" and self.cost_s is not None:
            return young_interval_s(self.cost_s, self.mtbi_s)
        return None

    def rows(self, rows_per_s: float | None) -> int:
        """The part size to use now, given the observed throughput."""
        if self.kind == "rows":
            if self.value is None:
                raise RuntimeError("checkpoint interval in rows has no row count")
            return int(self.value)
        tau = self.interval_s()
        if tau is None or not rows_per_s or rows_per_s <= 0:
            # Nothing to convert yet. One batch per part would turn a fresh worker's first
            # big job into hundreds of checkpoint writes; a few batches cost little if lost.
            return self._clamp(self.batch_rows * FIRST_PART_BATCHES)
        return self._clamp(math.ceil(tau * rows_per_s))

    def pin_rows(self, rows: int) -> None:
        """Answer ``rows`` from now on (a rebalance recommendation: checkpoint often)."""
        self.kind, self.value = "rows", float(self._clamp(rows))

    def _clamp(self, rows: int) -> int:
        return max(self.batch_rows, min(self.max_rows, rows))

    def __repr__(self) -> str:
        return f"CheckpointInterval(kind={self.kind!r}, value={self.value!r}, cost_s={self.cost_s!r})"


FIRST_PART_BATCHES = 16  # the part size before anything is measured, in batches
