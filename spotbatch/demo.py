"""``spotbatch demo``: the whole loop on one machine with embedded parts.

Starts the embedded broker (or uses ``--bootstrap``), creates a jobs topic, starts
worker processes in one consumer group, publishes a generated corpus as jobs, and
follows ``<topic>.results`` until every job is accounted for. With ``interruptions``,
spot notices reach random workers through fake AWS metadata endpoints during the run;
each drains, exits and is restarted, and the summary tells what that cost.
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
from spotbatch.fake_metadata import FakeAws
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
    interruptions: int = 0  # spot notices sent to random workers during the run
    seed: int = 7


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
    interruptions: int = 0
    rows_recomputed: int = 0
    max_drain_s: float = 0.0


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
    usage = f"{topic}.usage"
    with start_or_external(opts.bootstrap) as broker:
        ensure_topics(broker.bootstrap, {topic: opts.partitions, results_topic(topic): 1, dlq_topic(topic): 1, usage: 1})
        fleet = _Fleet(broker.bootstrap, topic, group, usage, opts, output)
        log(f"broker {broker.bootstrap}; {opts.workers} workers started (model {opts.model}); logs in {output / 'logs'}")
        try:
            started = time.monotonic()
            jobs, _ = _publish(broker.bootstrap, topic, opts)
            done_rows, failed = _follow(broker.bootstrap, topic, jobs, opts, fleet, on_progress)
            seconds = time.monotonic() - started
        finally:
            fleet.stop()
        dlq = len(read_all(broker.bootstrap, dlq_topic(topic), timeout_s=30))
        drains = [json.loads(r.value) for r in read_all(broker.bootstrap, usage, timeout_s=30)]
    spot = [d for d in drains if d.get("kind") == "interruption" and str(d.get("reason", "")).startswith("aws")]
    return DemoSummary(jobs=jobs, rows=done_rows, failed=failed, dlq=dlq, seconds=round(seconds, 2),
                       rows_per_s=round(done_rows / seconds, 1) if seconds else 0.0, output=str(output),
                       workers=opts.workers, model=opts.model, interruptions=len(spot),
                       rows_recomputed=sum(d["rows_lost"] for d in spot),
                       max_drain_s=max((d["drain_s"] for d in spot), default=0.0))


class _Fleet:
    """The demo's worker processes; with interruptions, each has a fake AWS metadata
    endpoint, so a spot notice reaches it the way it would on EC2, and is restarted."""

    def __init__(self, bootstrap: str, topic: str, group: str, usage: str, opts: DemoOptions, output: Path) -> None:
        self._args = (bootstrap, topic, group, usage, opts, output)
        self._rng = random.Random(opts.seed)
        self._started = 0
        self.slots: list[tuple[subprocess.Popen, FakeAws | None]] = [self._start() for _ in range(opts.workers)]
        self.notices_sent = 0

    def _start(self) -> tuple[subprocess.Popen, FakeAws | None]:
        bootstrap, topic, group, usage, opts, output = self._args
        fake = FakeAws().__enter__() if opts.interruptions else None
        cmd = [sys.executable, "-m", "spotbatch", "worker", "--bootstrap", bootstrap, "--topic", topic, "--group", group,
               "--model", opts.model, "--output", str(output), "--torch-threads", str(opts.torch_threads),
               "--session-timeout-ms", "6000", "--notice-source", "aws" if fake else "signal"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPOTBATCH_USAGE_TOPIC": usage}
        if fake:
            env.update(SPOTBATCH_AWS_METADATA_URL=fake.url, SPOTBATCH_NOTICE_POLL_S="0.2")
        log_file = open(output / "logs" / f"worker-{self._started}.log", "wb")  # noqa: SIM115 - owned by the child
        self._started += 1
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env), fake

    def interrupt_one(self) -> None:
        """A spot notice (2 minutes' warning, as AWS gives) to a random running worker."""
        live = [i for i, (p, fake) in enumerate(self.slots) if p.poll() is None and fake is not None]
        if live:
            self.slots[self._rng.choice(live)][1].notice(action="terminate", in_s=120)
            self.notices_sent += 1

    def supervise(self) -> None:
        """Restart workers that drained after a notice; any other exit is an error."""
        for i, (proc, fake) in enumerate(self.slots):
            if proc.poll() is None:
                continue
            if fake is None or proc.returncode != 0:
                raise RuntimeError(f"worker {i} exited with {proc.returncode}; see its log under the output folder's logs/")
            fake.__exit__(None, None, None)
            self.slots[i] = self._start()

    def stop(self, grace_s: float = 30.0) -> None:
        for proc, _ in self.slots:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, fake in self.slots:
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if fake is not None:
                fake.__exit__(None, None, None)


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


def _follow(bootstrap: str, topic: str, jobs: int, opts: DemoOptions, fleet: _Fleet,
            on_progress: OnProgress | None) -> tuple[int, int]:
    """Read status records until every job has one; returns (rows done, failed jobs).

    Interruptions are spread over the run: the k-th notice goes out once k/(N+1) of
    the jobs are done.
    """
    reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    reader.assign([TopicPartition(results_topic(topic), 0)])
    seen: dict[str, dict] = {}  # job id -> latest status (redeliveries repeat a job)
    deadline = time.monotonic() + opts.timeout_s
    try:
        while len(seen) < jobs:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(seen)}/{jobs} jobs finished in {opts.timeout_s:.0f}s; see the worker logs")
            fleet.supervise()
            if fleet.notices_sent < opts.interruptions and len(seen) >= jobs * (fleet.notices_sent + 1) / (opts.interruptions + 1):
                fleet.interrupt_one()
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


def summary_json(summary: DemoSummary) -> str:
    return json.dumps(asdict(summary))
