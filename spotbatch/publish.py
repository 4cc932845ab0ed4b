"""Publishing jobs: rows -> job messages on the jobs topic.

Job ids are ``<prefix>-<n>`` with n counting from 0 in file order, so publishing the
same file again yields the same ids, and workers overwrite the same output files
instead of writing second copies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from kafka import KafkaProducer

from spotbatch.errors import JobError
from spotbatch.jobs import Job, job_key, parse_job

__all__ = ["PublishReport", "PublishError", "publish_jobs", "publish_raw", "check_raw", "rows_to_jobs", "job_prefix_for"]

Progress = Callable[[int, int], None]  # (jobs sent, rows sent)


class PublishError(ValueError):
    """Bad input for publishing; the message says which line/row and how to fix it."""


@dataclass
class PublishReport:
    jobs: int = 0
    rows: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0


def job_prefix_for(name: str) -> str:
    """A job-id-safe prefix from a file name ("my data.jsonl" -> "my_data")."""
    stem = re.sub(r"\.(jsonl|ndjson|json|parquet|pq)$", "", name.rsplit("/", 1)[-1])
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip("._-")[:100] or "job"


def rows_to_jobs(
    rows: Iterable[dict[str, Any]], *, model: str, input_column: str, rows_per_job: int, prefix: str,
    output: str | None = None, params: dict[str, Any] | None = None,
) -> Iterator[Job]:
    """Group rows into inline jobs; a row without ``id`` or the input column is an error."""
    if rows_per_job < 1:
        raise PublishError("--rows-per-job must be >= 1")
    chunk: list[dict[str, Any]] = []
    n = 0
    for i, row in enumerate(rows):
        if "id" not in row or input_column not in row:
            raise PublishError(f"row {i}: needs 'id' and {input_column!r} keys, has {sorted(row)}")
        chunk.append({"id": str(row["id"]), input_column: row[input_column]})
        if len(chunk) == rows_per_job:
            yield _job(prefix, n, model, chunk, output, params)
            chunk, n = [], n + 1
    if chunk:
        yield _job(prefix, n, model, chunk, output, params)


def _job(prefix: str, n: int, model: str, rows: list, output: str | None, params: dict | None) -> Job:
    data = {"job_id": f"{prefix}-{n:06d}", "model": model, "inputs": {"rows": rows}, "params": params or {}}
    if output:
        data["output"] = output
    try:
        return parse_job(json.dumps(data).encode())
    except JobError as err:
        raise PublishError(f"job {data['job_id']}: {err.reason}") from None


def publish_jobs(producer: KafkaProducer, topic: str, jobs: Iterable[Job], progress: Progress | None = None) -> PublishReport:
    """Send jobs keyed by job id; waits for every acknowledgement before returning."""
    return _send_all(producer, topic, ((job_key(j.job_id), j.to_bytes(), _rows(j)) for j in jobs), progress)


def publish_raw(producer: KafkaProducer, topic: str, lines: Iterable[bytes], progress: Progress | None = None) -> PublishReport:
    """Send job JSON lines as they are, once every line parses as a job: a bad line
    anywhere sends nothing (PublishError names it and counts the others)."""
    return _send_all(producer, topic, check_raw(lines), progress)


def check_raw(lines: Iterable[bytes]) -> list[tuple[bytes, bytes, int]]:
    """(key, value, rows) of every job line; PublishError naming the first bad line (and
    how many more) if any line is not a valid job. Callers may check before connecting."""
    items, bad = [], []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            job = parse_job(line.strip())
        except JobError as err:
            bad.append(f"line {i}: {err}")
            continue
        items.append((job_key(job.job_id), line.strip(), _rows(job)))
    if bad:
        more = f" (and {len(bad) - 1} more bad line{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
        raise PublishError(f"{bad[0]}{more}; nothing was sent")
    return items


def _rows(job: Job) -> int:
    return len(job.inputs.rows) if hasattr(job.inputs, "rows") else 0


def _send_all(producer: KafkaProducer, topic: str, items: Iterable[tuple[bytes, bytes, int]], progress: Progress | None) -> PublishReport:
    report = PublishReport()
    pending: list[tuple[bytes, Any]] = []  # (key, kafka's FutureRecordMetadata)

    def settle(keep: int) -> None:
        while len(pending) > keep:
            key, fut = pending.pop(0)
            try:
                fut.get(timeout=60)
            except Exception as exc:  # noqa: BLE001 - every failed send is counted and named
                report.failed += 1
                report.errors.append(f"{key.decode()}: {exc}")

    for key, value, rows in items:
        pending.append((key, producer.send(topic, key=key, value=value)))
        report.jobs += 1
        report.rows += rows
        settle(keep=1000)  # bounded memory for huge files
        if progress:
            progress(report.jobs, report.rows)
    producer.flush()
    settle(keep=0)
    return report
