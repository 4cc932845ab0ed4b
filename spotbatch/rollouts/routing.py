"""Which version a job takes: a stable hash of its job id against the step's fraction.

The hash is SHA-256 (not Python's ``hash``, which is salted per process), so every
worker, and a redelivery to another worker, sends a job id to the same side.
"""

from __future__ import annotations

import hashlib

__all__ = ["bucket_of", "routes_to_challenger"]


def bucket_of(job_id: str) -> float:
    """A job id's place in [0, 1), uniform over ids."""
    digest = hashlib.sha256(job_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def routes_to_challenger(job_id: str, fraction: float) -> bool:
    """True for the jobs in the step's slice; a larger step keeps every job of a smaller one."""
    return bucket_of(job_id) < fraction
