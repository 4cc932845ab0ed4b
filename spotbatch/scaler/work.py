"""The work mode's two inputs: rows still to do, and rows/s one replica does.

- Pending rows: the job messages between a group's committed offset and the log end
  (committed only once durable, so jobs in flight count too), inline rows counted from
  the message, URI jobs from the file's Parquet footer or JSONL line count (cached by
  job id), less what checkpoints say is done of them. ``PendingWork`` reads each new
  message once and keeps a per-partition index of (offset -> job, rows).
- Rate: workers' usage records (``spotbatch.usage``, kind ``usage``), rows /
  seconds_busy over a recent window; a configured default until there are reports.
  ``UsageRates`` follows the topic; a redelivered record (same record_id) counts once.

The arithmetic is in pure functions (``pending_rows``, ``learned_rate``); the classes
only feed them from Kafka.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from spotbatch.errors import JobError
from spotbatch.input_access import InputPolicy
from spotbatch.inputs import count_rows
from spotbatch.jobs import Job, parse_job
from spotbatch.records import UsageRecord, usage_or_none
from spotbatch.usage_tail import UsageTail

__all__ = [
    "JobRows",
    "UsageSample",
    "pending_rows",
    "learned_rate",
    "count_input_rows",
    "RowCounter",
    "PendingWork",
    "UsageRates",
]

log = logging.getLogger(__name__)

TopicPartitionKey = tuple[str, int]


@dataclass(frozen=True)
class JobRows:
    """One unconsumed job message: its id (None if it does not parse) and rows."""

    job_id: str | None
    rows: int
    uri: bool = False  # a URI job: its checkpoint may say some rows are done


@dataclass(frozen=True)
class UsageSample:
    """What ``learned_rate`` reads of a usage record (a UsageRecord has the same fields)."""

    record_id: str
    worker: str
    end: float  # epoch s
    rows: int
    seconds_busy: float


def pending_rows(jobs: Iterable[JobRows], rows_done: Mapping[str, int]) -> int:
    """Rows still to do: each job's rows less its checkpointed rows (never below 0).

    A job listed twice (republished) counts twice: both messages will be consumed.
    """
    total = 0
    for job in jobs:
        done = rows_done.get(job.job_id, 0) if job.uri and job.job_id else 0
        total += max(job.rows - done, 0)
    return total


def learned_rate(samples: Iterable[UsageSample | UsageRecord], *, now: float, window_s: float, default: float) -> float:
    """Rows/s per replica: sum(rows) / sum(seconds_busy) of samples ending within
    ``window_s`` of ``now``; ``default`` until some busy time is reported."""
    rows = busy = 0.0
    for s in samples:
        if s.end >= now - window_s and s.seconds_busy > 0:
            rows += s.rows
            busy += s.seconds_busy
    return rows / busy if busy > 0 and rows > 0 else default


def count_input_rows(uri: str, policy: InputPolicy | None = None) -> int:
    """Rows in a job's input file, read as a worker reads it (the same prefixes and
    bounds): the Parquet footer (ranged GETs on S3), or one streaming pass over JSONL."""
    if policy is not None:
        uri = policy.resolve(uri)
    return count_rows(uri)


class RowCounter:
    """Rows of a job; URI jobs' counts cached by job id (an LRU of ``max_jobs``).

    A URI that cannot be read counts 0 rows: the worker will dead-letter that job, and
    its record still shows as lag, so the scaler stays active until it is handled.
    """

    def __init__(self, *, max_jobs: int = 100_000, count: Callable[[str], int] | None = None,
                 input_prefixes: Sequence[str] = ()) -> None:
        # Where workers may not read (outside input_prefixes), the job will be dead-lettered: 0 rows.
        self._count = count or functools.partial(count_input_rows, policy=InputPolicy(input_prefixes))
        self._max = max_jobs
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def rows(self, job: Job) -> int:
        if hasattr(job.inputs, "rows"):
            return len(job.inputs.rows)
        with self._lock:
            if job.job_id in self._cache:
                self._cache.move_to_end(job.job_id)
                return self._cache[job.job_id]
        try:
            n = self._count(job.inputs.uri)
        except (JobError, OSError, ValueError) as exc:
            log.warning("cannot count rows of job %s (%s): %s", job.job_id, job.inputs.uri, exc)
            return 0  # not cached: the file may appear later
        with self._lock:
            self._cache[job.job_id] = n
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return n

    def job_rows(self, value: bytes | None) -> JobRows:
        try:
            job = parse_job(value)
        except JobError:
            return JobRows(None, 0)  # a bad job: dead-lettered, no inference
        return JobRows(job.job_id, self.rows(job), uri=not hasattr(job.inputs, "rows"))


class PendingWork:
    """Pending rows of one (group, topic) from the job messages not yet committed.

    Each call reads only the messages appended since the last one; entries below the
    committed offset are dropped. ``checkpoints``: a CheckpointStore (or None) for the
    rows already done of URI jobs.
    """

    def __init__(self, reader, *, counter: RowCounter | None = None, checkpoints=None,
                 offset_reset_policy: str = "earliest") -> None:
        self._reader = reader  # kafka_admin.OffsetReader
        self._counter = counter or RowCounter()
        self._checkpoints = checkpoints
        self._reset = offset_reset_policy
        self._index: dict[TopicPartitionKey, dict[int, JobRows]] = {}
        self._scanned: dict[TopicPartitionKey, int] = {}  # next offset to read
        self._lock = threading.Lock()

    def pending(self, committed: Mapping[TopicPartitionKey, int], log_ends: Mapping[TopicPartitionKey, int]) -> int:
        with self._lock:
            starts = {tp: self._start(committed.get(tp, -1), end) for tp, end in log_ends.items()}
            self._read_new(starts, log_ends)
            jobs = [job for tp, start in starts.items()
                    for offset, job in self._index.get(tp, {}).items() if start <= offset < log_ends[tp]]
        return pending_rows(jobs, self._rows_done(jobs))

    def _start(self, committed: int, log_end: int) -> int:
        if committed >= 0:
            return committed
        return 0 if self._reset == "earliest" else log_end  # where a new consumer would begin

    def _read_new(self, starts: Mapping[TopicPartitionKey, int], ends: Mapping[TopicPartitionKey, int]) -> None:
        ranges = {}
        for tp, start in starts.items():
            index = self._index.setdefault(tp, {})
            for offset in [o for o in index if o < start]:
                del index[offset]
            ranges[tp] = (max(start, self._scanned.get(tp, 0)), ends[tp])
        for record in self._reader.read_ranges(ranges):
            self._index[(record.topic, record.partition)][record.offset] = self._counter.job_rows(record.value)
        for tp, (_, end) in ranges.items():
            self._scanned[tp] = max(self._scanned.get(tp, 0), end)

    def _rows_done(self, jobs: list[JobRows]) -> dict[str, int]:
        if self._checkpoints is None:
            return {}
        done = {}
        for job in jobs:
            if job.uri and job.job_id and job.job_id not in done:
                try:
                    progress = self._checkpoints.load(job.job_id)
                except Exception as exc:  # noqa: BLE001 - a bad checkpoint must not stop scaling
                    log.warning("cannot read the checkpoint of job %s: %s", job.job_id, exc)
                    progress = None
                done[job.job_id] = progress.rows_done if progress else 0
        return done


class UsageRates:
    """Rows/s per replica learned from the usage topic (all partitions, no group)."""

    def __init__(self, reader, topic: str, *, window_s: float = 600.0,
                 clock: Callable[[], float] = time.time, max_samples: int = 100_000) -> None:
        # Other kinds (interruption records) and unreadable records are not ours: None.
        self._tail = UsageTail(reader, topic, parse=usage_or_none, record_id=lambda s: s.record_id,
                               end=lambda s: s.end, window_s=window_s, clock=clock, max_items=max_samples)
        self._window_s = window_s
        self._clock = clock

    def rate(self, default: float) -> float:
        return learned_rate(self._tail.items(), now=self._clock(), window_s=self._window_s, default=default)

