"""Shadow runs: how far the challenger agrees with the champion on the same rows.

Per row, over every float output column the two share: cosine similarity for a 2-D
column (embeddings), ``1 - |a - b| / max(|a|, |b|)`` for a 1-D one; a row's agreement
is its lowest over the columns. A NaN anywhere counts as no agreement (0).
"""

from __future__ import annotations

import time

import numpy as np

from spotbatch.rollouts.records import ShadowRecord
from spotbatch.workers.batcher import PendingJob

__all__ = ["row_agreement", "shadow_record"]

_EPS = 1e-12


def row_agreement(champion: dict[str, np.ndarray], challenger: dict[str, np.ndarray]) -> np.ndarray:
    """One agreement in [-1, 1] per row; ValueError when no float column is shared."""
    columns = [c for c in champion if c in challenger and np.issubdtype(np.asarray(champion[c]).dtype, np.floating)]
    if not columns:
        raise ValueError(f"no float output column in common ({sorted(champion)} vs {sorted(challenger)})")
    per_column = []
    for name in columns:
        a, b = np.asarray(champion[name], np.float64), np.asarray(challenger[name], np.float64)
        if a.shape != b.shape:
            raise ValueError(f"column {name!r} has shape {a.shape} on the champion, {b.shape} on the challenger")
        if a.ndim == 2:
            dot = (a * b).sum(axis=1)
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            # Two zero vectors agree; a zero vector against a real one does not.
            score = np.where(norms > _EPS, dot / np.maximum(norms, _EPS), np.where(
                (np.abs(a).sum(axis=1) <= _EPS) & (np.abs(b).sum(axis=1) <= _EPS), 1.0, 0.0))
        else:
            scale = np.maximum(np.maximum(np.abs(a), np.abs(b)), _EPS)
            score = 1.0 - np.abs(a - b) / scale
        per_column.append(np.nan_to_num(score, nan=0.0))
    return np.min(np.stack(per_column), axis=0)


def shadow_record(primary: PendingJob, shadow: PendingJob, *, worker: str) -> ShadowRecord:
    scores = row_agreement(primary.outputs(), shadow.outputs())
    champion, challenger = primary.served, shadow.served
    return ShadowRecord(job_id=primary.job.job_id, model=champion.model, champion=champion.version.version,
                        challenger=challenger.version.version, rows=int(scores.size),
                        mean=round(float(scores.mean()), 6), low=round(float(np.percentile(scores, 5)), 6),
                        min=round(float(scores.min()), 6), worker=worker, at=round(time.time(), 3))
