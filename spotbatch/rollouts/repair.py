"""Repair after a bad version: re-publish the jobs it wrote, so the champion rewrites them.

Which jobs: those whose LAST ok status record (of this model, any version) came from the
bad version, routed by the rollout (pinned jobs asked for that version by number and
would get it again). A job rewritten since (by a redelivery, or an earlier repair) is
skipped, and each job id is re-published once however many records it has. Outputs are
named by job id and written atomically, so the champion's run overwrites the bad output.

What is re-published: the original record, read back at its ``source`` coordinates: the
same value bytes, key and headers, to the jobs topic. A record gone from the log
(retention) is counted as ``missing``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kafka import KafkaProducer

from spotbatch.kafka_admin import OffsetReader, log_end_offsets
from spotbatch.records import results_topic
from spotbatch.rollouts.observe import Outcome, outcomes, read_since

__all__ = ["repair", "jobs_to_repair"]

_GAP = 64  # offsets this close are read as one range (one fetch) rather than one each


def jobs_to_repair(seen: list[Outcome], version: int) -> dict[str, Outcome]:
    """{job_id: the bad version's status} for the jobs whose last ok output it wrote."""
    last: dict[str, Outcome] = {}
    for o in sorted(seen, key=lambda o: o.at_ms):  # stable: records of one ms keep log order
        if o.ok and o.job_id is not None:
            last[o.job_id] = o
    return {job: o for job, o in last.items()
            if o.version == version and o.route != "pinned" and o.source is not None}


def _coords(o: Outcome) -> tuple[str, int, int] | None:
    src = o.source or {}
    topic, partition, offset = src.get("topic"), src.get("partition"), src.get("offset")
    if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int) and offset >= 0:
        return topic, partition, offset
    return None


def _ranges(offsets: list[int]) -> list[tuple[int, int]]:
    """Sorted offsets -> [start, end) ranges, merging those within _GAP of each other."""
    ranges: list[tuple[int, int]] = []
    for off in offsets:
        if ranges and off - ranges[-1][1] < _GAP:
            ranges[-1] = (ranges[-1][0], off + 1)
        else:
            ranges.append((off, off + 1))
    return ranges


def read_originals(bootstrap: str, wanted: set[tuple[str, int, int]], *, client_options: Mapping | None = None,
                   timeout_s: float = 30.0) -> dict[tuple[str, int, int], Any]:
    """The records at ``wanted`` coordinates that still exist, by coordinates."""
    per_tp: dict[tuple[str, int], list[int]] = {}
    for topic, partition, offset in wanted:
        per_tp.setdefault((topic, partition), []).append(offset)
    ends: dict[tuple[str, int], int] = {}
    for topic in {t for t, _ in per_tp}:
        ends |= {(topic, p): end for p, end in log_end_offsets(bootstrap, topic, client_options=client_options).items()}
    queues = {tp: [(s, min(e, ends.get(tp, 0))) for s, e in _ranges(sorted(offs))] for tp, offs in per_tp.items()}
    found: dict[tuple[str, int, int], Any] = {}
    reader = OffsetReader(bootstrap, timeout_s=timeout_s, client_options=client_options)
    try:
        while any(queues.values()):  # one range per partition per read: read_ranges takes one each
            batch = {tp: queue.pop(0) for tp, queue in queues.items() if queue}
            for record in reader.read_ranges(batch):
                coords = (record.topic, record.partition, record.offset)
                if coords in wanted:
                    found[coords] = record
    finally:
        reader.close()
    return found


def repair(bootstrap: str, name: str, version: int, jobs_topic: str, *, client_options: Mapping | None = None,
           timeout_s: float = 30.0) -> dict[str, int]:
    """Re-publish the jobs ``version`` of ``name`` wrote last; {jobs, rows, missing}."""
    seen = outcomes(read_since(bootstrap, results_topic(jobs_topic), 0, client_options=client_options,
                               timeout_s=timeout_s), name)
    todo = {job: (o, _coords(o)) for job, o in jobs_to_repair(seen, version).items()}
    wanted = {c for _, c in todo.values() if c is not None}
    originals = read_originals(bootstrap, wanted, client_options=client_options, timeout_s=timeout_s) if wanted else {}
    sent = [(o, originals[c]) for o, c in todo.values() if c is not None and c in originals]
    if sent:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **dict(client_options or {}))
        try:
            futures = [producer.send(jobs_topic, key=r.key, value=r.value, headers=list(r.headers or []) or None)
                       for _, r in sent]
            for fut in futures:
                fut.get(timeout=timeout_s)
        finally:
            producer.close(timeout=5)
    return {"jobs": len(sent), "rows": sum(o.rows for o, _ in sent), "missing": len(todo) - len(sent)}
