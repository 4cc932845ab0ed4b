"""``spotbatch demo``: the whole loop on one machine with embedded parts.

Starts the embedded broker (or uses ``--bootstrap``), creates a jobs topic, starts
worker processes in one consumer group, publishes a generated corpus as jobs, and
follows ``<topic>.results`` until every job is accounted for.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from spotbatch.embedded import start_or_external
from spotbatch.kafka_admin import ensure_topics, read_all
from spotbatch.publish import publish_jobs, rows_to_jobs
from spotbatch.workers.streams import dlq_topic, results_topic

__all__ = ["DemoOptions", "DemoSummary", "run_demo", "sample_corpus"]

_SUBJECTS = ["The spot fleet", "A GPU worker", "The scheduler", "Our pipeline", "The consumer group",
             "A preempted node", "The batch job", "An on-demand replica", "The embedding model", "KEDA"]
_VERBS = ["rebalances", "checkpoints", "embeds", "scales out", "drains", "retries", "commits", "publishes"]
_OBJECTS = ["every partition before the notice ends", "a thousand rows of text", "results to Parquet on S3",
            "the lag reported by Kafka", "its progress every few seconds", "jobs from the queue",
            "sentences about cheap compute", "the work that was in flight"]


@dataclass
class DemoOptions:
    bootstrap: str | None = None
    model: str = "minilm"
    rows: int = 2000
    rows_per_job: int = 25
    workers: int = 2
    partitions: int = 4
    output: str = "./spotbatch-demo-output"
    timeout_s: float = 300.0
    torch_threads: int = 1


@dataclass
class DemoSummary:
    jobs: int
    rows: int
    failed: int
    dlq: int
    seconds: float
    rows_per_s: float
    output: str
    workers: int
    model: str


def sample_corpus(n: int, seed: int = 7) -> Iterator[dict]:
    """Deterministic short sentences, ~15-25 tokens each, with stable ids."""
    rng = random.Random(seed)
    for i in range(n):
        text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} (item {i})."
        yield {"id": f"row-{i:06d}", "text": text}


# (jobs_done, rows_done, failed) after each status record
OnProgress = Callable[[int, int, int], None]


def run_demo(opts: DemoOptions, on_progress: OnProgress | None = None, log=print) -> DemoSummary:
    output = Path(opts.output).resolve()
    shutil.rmtree(output, ignore_errors=True)
    (output / "logs").mkdir(parents=True)
    topic, group = f"spotbatch.demo.{int(time.time())}", "spotbatch-demo"
    with start_or_external(opts.bootstrap) as broker:
        ensure_topics(broker.bootstrap, {topic: opts.partitions, results_topic(topic): 1, dlq_topic(topic): 1})
        procs = [_start_worker(broker.bootstrap, topic, group, opts, output, i) for i in range(opts.workers)]
        log(f"broker {broker.bootstrap}; {opts.workers} workers started (model {opts.model}); logs in {output / 'logs'}")
        try:
            started = time.monotonic()
            jobs, rows = _publish(broker.bootstrap, topic, opts)
            done_rows, failed = _follow(broker.bootstrap, topic, jobs, opts, procs, on_progress)
            seconds = time.monotonic() - started
        finally:
            _stop_workers(procs)
        dlq = len(read_all(broker.bootstrap, dlq_topic(topic), timeout_s=30))
    return DemoSummary(jobs=jobs, rows=done_rows, failed=failed, dlq=dlq, seconds=round(seconds, 2),
                       rows_per_s=round(done_rows / seconds, 1) if seconds else 0.0, output=str(output),
                       workers=opts.workers, model=opts.model)


def _start_worker(bootstrap: str, topic: str, group: str, opts: DemoOptions, output: Path, i: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spotbatch", "worker", "--bootstrap", bootstrap, "--topic", topic, "--group", group,
           "--model", opts.model, "--output", str(output), "--torch-threads", str(opts.torch_threads),
           "--session-timeout-ms", "6000"]
    log_file = open(output / "logs" / f"worker-{i}.log", "wb")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _publish(bootstrap: str, topic: str, opts: DemoOptions) -> tuple[int, int]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    try:
        jobs = rows_to_jobs(sample_corpus(opts.rows), model=opts.model, input_column="text",
                            rows_per_job=opts.rows_per_job, prefix="demo")
        report = publish_jobs(producer, topic, jobs)
    finally:
        producer.close()
    if not report.ok:
        raise RuntimeError(f"{report.failed} jobs failed to publish: {report.errors[:3]}")
    return report.jobs, report.rows


def _follow(bootstrap: str, topic: str, jobs: int, opts: DemoOptions, procs: list, on_progress: OnProgress | None) -> tuple[int, int]:
    """Read status records until every job has one; returns (rows done, failed jobs)."""
    reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    reader.assign([TopicPartition(results_topic(topic), 0)])
    seen: dict[str, dict] = {}  # job id -> latest status (redeliveries repeat a job)
    deadline = time.monotonic() + opts.timeout_s
    try:
        while len(seen) < jobs:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(seen)}/{jobs} jobs finished in {opts.timeout_s:.0f}s; see the worker logs")
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker exited early; see its log under the output folder's logs/")
            for recs in reader.poll(timeout_ms=200).values():
                for rec in recs:
                    status = json.loads(rec.value)
                    seen[status["job_id"] or f"?{rec.offset}"] = status
            if on_progress:
                on_progress(*_tally(seen))
    finally:
        reader.close()
    _, rows, failed = _tally(seen)
    return rows, failed


def _tally(seen: dict[str, dict]) -> tuple[int, int, int]:
    ok = [s for s in seen.values() if s["status"] == "ok"]
    return len(seen), sum(s.get("rows", 0) for s in ok), len(seen) - len(ok)


def _stop_workers(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def summary_json(summary: DemoSummary) -> str:
    return json.dumps(asdict(summary))
