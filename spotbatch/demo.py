"""``spotbatch demo``: the whole loop on one machine with embedded parts.

Starts the embedded broker (or uses ``--bootstrap``), creates a jobs topic, runs worker
processes in one consumer group through the local autoscaler (``spotbatch.scaler.local``:
between ``min_workers`` and ``workers``, from the group's lag), publishes a generated
corpus as jobs, and follows ``<topic>.results`` until every job is accounted for; with
``min_workers`` 0 it then waits for the scale to zero. With ``interruptions``, spot
notices reach random workers through fake AWS metadata endpoints during the run; each
drains and exits, the autoscaler replaces it, and the summary tells what that cost.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from spotbatch.embedded import start_or_external
from spotbatch.testing.metadata import FakeAws
from spotbatch.kafka_admin import ensure_topics, read_all
from spotbatch.publish import publish_jobs, rows_to_jobs
from spotbatch.records import StatusRecord, StopCause, dlq_topic, interruptions, results_topic
from spotbatch.scaler.backlog import GroupBacklog
from spotbatch.scaler.decide import ScalePolicy
from spotbatch.scaler.local import SCALE_ACTIONS, LocalAutoscaler, ScaleEvent
from spotbatch.scaler.procs import WorkerCrashLoop, WorkerPool

__all__ = ["DemoOptions", "DemoSummary", "OutputNotEmpty", "prepare_output", "run_demo", "sample_corpus"]

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
    workers: int = 2  # the most the autoscaler runs at once
    min_workers: int = 0
    lag_threshold: int = 10  # jobs of lag per worker (KEDA lagThreshold)
    cooldown_s: float = 3.0  # no unconsumed job this long: scale to zero
    poll_s: float = 0.5
    partitions: int = 4
    output: str = "./spotbatch-demo-output"
    timeout_s: float = 300.0
    torch_threads: int = 1
    interruptions: int = 0  # spot notices sent to random workers during the run
    seed: int = 7
    force: bool = False  # empty ``output`` even if it holds something a demo did not write
    rollout: bool = False  # then two model rollouts on the same broker (spotbatch.demo_rollout)


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
    interruptions: int = 0  # notices that interrupted a worker (its drain record says so)
    notices_sent: int = 0  # of the --interruptions asked; fewer if the jobs ran out first
    rows_recomputed: int = 0
    max_drain_s: float = 0.0
    max_replicas: int = 0
    scale_events: list[dict] = field(default_factory=list)  # {t_s, event, from, to, lag, unconsumed}
    cost: dict | None = None  # the cost report of this run (spotbatch.scheduler.report.report_json)
    rollout: dict | None = None  # with --rollout: each rollout's outcome, repairs, outputs by version


def sample_corpus(n: int, seed: int = 7) -> Iterator[dict]:
    """Deterministic short sentences, ~15-25 tokens each, with stable ids."""
    rng = random.Random(seed)
    for i in range(n):
        text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} (item {i})."
        yield {"id": f"row-{i:06d}", "text": text}


# (jobs_done, rows_done, failed, running workers) after each status record and poll
OnProgress = Callable[[int, int, int, int], None]


MARKER = ".spotbatch-demo-output"  # under logs/ of every folder a demo wrote: it may empty it next time


class OutputNotEmpty(ValueError):
    """The demo's output folder holds something a demo did not write."""


def _demo_entry(name: str) -> bool:
    """What a demo writes at the top of its output: job files, logs, checkpoints, temp files."""
    return (name == "logs" or name.startswith(("demo-", "_", "."))) and name != ".git"


def prepare_output(folder: str | Path, *, force: bool = False) -> Path:
    """An empty output folder, made or emptied, with the demo's marker in it.

    A folder that exists is emptied only if it is empty, or it is a previous demo's output
    (the marker is there and nothing else a demo would not write), or ``force``. The working
    directory, a folder above it, the home folder and ``/`` are never emptied."""
    output = Path(folder).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise OutputNotEmpty(f"--output {folder} is a file, not a folder; choose a new or empty folder")
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if output.is_dir() and any(output.iterdir()):
        where = ("the working directory" if output == cwd else "a folder above the working directory"
                 if output in cwd.parents else "your home folder" if output == home else None)
        if where:
            raise OutputNotEmpty(f"--output {folder} is {where} ({output}), and the demo empties its output first: "
                                 "name a new folder, e.g. --output ./spotbatch-demo-output (--force does not "
                                 "change this)")
        strangers = sorted(e.name for e in output.iterdir() if not _demo_entry(e.name))
        if not force and (not (output / "logs" / MARKER).exists() or strangers):
            n = len(strangers)
            what = f"{n} {'entry' if n == 1 else 'entries'} a demo did not write (e.g. {strangers[0]})" if n else \
                "files, and no mark of a previous demo"
            raise OutputNotEmpty(f"--output {folder} holds {what}; the demo empties its output first: choose a "
                                 "new or empty folder, or add --force to empty this one")
        for entry in output.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    (output / "logs").mkdir(parents=True, exist_ok=True)
    (output / "logs" / MARKER).write_text("written by `spotbatch demo`: a later demo may empty this folder\n")
    return output


def run_demo(opts: DemoOptions, on_progress: OnProgress | None = None, log=print) -> DemoSummary:
    output = prepare_output(opts.output, force=opts.force)
    topic, group = f"spotbatch.demo.{int(time.time())}", "spotbatch-demo"
    usage = f"{topic}.usage"
    with start_or_external(opts.bootstrap) as broker:
        ensure_topics(broker.bootstrap, {topic: opts.partitions, results_topic(topic): 1, dlq_topic(topic): 1, usage: 1})
        fleet = _Fleet(broker.bootstrap, topic, group, usage, opts, output, log)
        log(f"broker {broker.bootstrap}; autoscaling {opts.min_workers}..{opts.workers} workers (model {opts.model}); "
            f"logs in {output / 'logs'}")
        try:
            started = time.monotonic()
            fleet.supervise()  # the minimum starts before the jobs arrive
            jobs, _ = _publish(broker.bootstrap, topic, opts)
            done_rows, failed = _follow(broker.bootstrap, topic, jobs, opts, fleet, on_progress)
            seconds = time.monotonic() - started
            if opts.min_workers == 0:
                log(f"all {jobs} jobs done; scaling to zero after {opts.cooldown_s:g}s without unconsumed jobs")
                fleet.settle(started + opts.timeout_s, lambda n: on_progress(jobs, done_rows, failed, n) if on_progress else None)
        except WorkerCrashLoop as exc:  # say what the worker said, not only that it died
            raise RuntimeError(fleet.why_exited(exc)) from None
        finally:
            fleet.stop()
        dlq = len(read_all(broker.bootstrap, dlq_topic(topic), timeout_s=30))
        drains = interruptions(r.value for r in read_all(broker.bootstrap, usage, timeout_s=30))
        cost = _cost_report(broker.bootstrap, usage, log)
        rollout = None
        if opts.rollout:
            from spotbatch.demo_rollout import run_rollout_demo

            texts = [row["text"] for row in sample_corpus(2000, seed=opts.seed + 4)]
            rollout = run_rollout_demo(broker.bootstrap, output, texts, model=opts.model,
                                       torch_threads=opts.torch_threads, timeout_s=opts.timeout_s * 2, log=log)
    spot = [d for d in drains if d.cause is StopCause.AWS]  # the demo's notices come from fake AWS endpoints
    return DemoSummary(jobs=jobs, rows=done_rows, failed=failed, dlq=dlq, seconds=round(seconds, 2),
                       rows_per_s=round(done_rows / seconds, 1) if seconds else 0.0, output=str(output),
                       workers=opts.workers, model=opts.model, interruptions=len(spot),
                       notices_sent=fleet.notices_sent,
                       rows_recomputed=sum(d.rows_lost for d in spot),
                       max_drain_s=max((d.drain_s for d in spot), default=0.0), cost=cost,
                       max_replicas=fleet.scaler.max_replicas, scale_events=fleet.scale_events(), rollout=rollout)


def _cost_report(bootstrap: str, usage: str, log) -> dict | None:
    """The cost report of this run, at illustrative demo prices (the workers' type is "local")."""
    from spotbatch.scheduler.report import UnpricedError, report_for_demo

    try:
        return report_for_demo(bootstrap, usage)
    except UnpricedError as exc:  # SPOTBATCH_INSTANCE_TYPE set in the environment: no demo price
        log(f"no cost report: {exc}")
        return None


class _Fleet:
    """The demo's worker processes, run by the local autoscaler. With interruptions,
    each worker has a fake AWS metadata endpoint, so a spot notice reaches it the way it
    would on EC2; it drains and exits, and the autoscaler replaces it while work remains.
    Any other exit the autoscaler did not ask for ends the demo."""

    def __init__(self, bootstrap: str, topic: str, group: str, usage: str, opts: DemoOptions, output: Path,
                 log: Callable[[str], None]) -> None:
        self._args = (bootstrap, topic, group, usage, opts, output)
        self._rng = random.Random(opts.seed)
        self._fakes: dict[int, FakeAws] = {}
        self._next_poll = 0.0
        self.notices_sent = 0
        self._noticed: set[int] = set()  # workers that got a notice (they drain, then exit)
        self._observe = GroupBacklog(bootstrap, group, topic, lag_threshold=opts.lag_threshold)
        policy = ScalePolicy(min_replicas=opts.min_workers, max_replicas=opts.workers,
                             lag_threshold=opts.lag_threshold, cooldown_s=opts.cooldown_s)
        def on_event(e: ScaleEvent) -> None:
            if e.event in SCALE_ACTIONS:
                log(e.line())

        self.scaler = LocalAutoscaler(observe=self._observe, pool=WorkerPool(self, drain_s=_DRAIN_S), policy=policy,
                                      poll_s=opts.poll_s, early_exit_s=opts.timeout_s, max_early_exits=1,
                                      on_event=on_event)

    # -- the autoscaler's Launcher --

    def start(self, index: int) -> subprocess.Popen:
        bootstrap, topic, group, usage, opts, output = self._args
        fake = FakeAws().__enter__() if opts.interruptions else None
        cmd = [sys.executable, "-m", "spotbatch", "worker", "--bootstrap", bootstrap, "--topic", topic, "--group", group,
               "--model", opts.model, "--output", str(output), "--torch-threads", str(opts.torch_threads),
               "--session-timeout-ms", "6000", "--notice-source", "aws" if fake else "signal"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPOTBATCH_USAGE_TOPIC": usage}
        if fake:
            self._fakes[index] = fake
            env.update(SPOTBATCH_AWS_METADATA_URL=fake.url, SPOTBATCH_NOTICE_POLL_S="0.2")
        # Same process group as the demo: if the demo is killed, its workers go with it.
        with open(output / "logs" / f"worker-{index}.log", "wb") as log_file:
            return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)

    def release(self, index: int) -> None:
        fake = self._fakes.pop(index, None)
        if fake is not None:
            fake.__exit__(None, None, None)

    # -- the demo's side --

    @property
    def replicas(self) -> int:
        return len(self.scaler.pool.running)

    def interrupt_one(self) -> bool:
        """A spot notice (2 minutes' warning, as AWS gives) to a random running worker that
        has had none: one already draining would count a notice that interrupts nobody.
        False (nothing sent) while every running worker has had one."""
        live = [slot.index for slot in self.scaler.pool.running
                if slot.index in self._fakes and slot.index not in self._noticed]
        if not live:
            return False
        index = self._rng.choice(live)
        self._fakes[index].notice(action="terminate", in_s=120)
        self._noticed.add(index)
        self.notices_sent += 1
        return True

    def supervise(self) -> None:
        """One autoscaler poll when one is due: scale from lag, replace drained workers."""
        if time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.scaler.poll_s
            self.scaler.step()

    def settle(self, deadline: float, on_replicas: Callable[[int], None]) -> None:
        """Keep polling until the autoscaler has scaled to zero (or the demo's deadline)."""
        while not self.scaler.done() and time.monotonic() < deadline:
            self.supervise()
            on_replicas(self.replicas)
            time.sleep(0.1)

    def why_exited(self, exc: Exception) -> str:
        """The error line the last worker that died printed, with its log's path."""
        exits = [e for e in self.scaler.events if e.event == "exited" and e.returncode]
        if not exits or not exits[-1].workers:
            return str(exc)
        path = self._args[5] / "logs" / f"worker-{exits[-1].workers[0]}.log"
        try:
            lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return str(exc)
        said = next((ln for ln in reversed(lines) if ln.startswith("error:")), None) or \
            next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        return f"a worker exited {exits[-1].returncode}: {said.removeprefix('error: ')} (log: {path})"

    def scale_events(self) -> list[dict]:
        return [{"t_s": e.t_s, "event": e.event, "from": e.replicas_from, "to": e.replicas_to, "lag": e.lag,
                 "unconsumed": e.unconsumed} for e in self.scaler.events if e.event in SCALE_ACTIONS]

    def stop(self) -> None:
        """Stop every worker (SIGTERM: each drains, as on a scale-in)."""
        try:
            self.scaler.close()
        finally:
            self._observe.close()


_DRAIN_S = 25.0  # the workers' default drain_s; SIGKILL a few seconds after it


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
    seen: dict[str, StatusRecord] = {}  # job id -> latest status (redeliveries repeat a job)
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
                    status = StatusRecord.parse(json.loads(rec.value))
                    key = status.job_id or f"?{rec.offset}"
                    if not (status.already_done and key in seen):  # a redelivery's report adds nothing
                        seen[key] = status
            if on_progress:
                on_progress(*_tally(seen), fleet.replicas)
    finally:
        reader.close()
    _, rows, failed = _tally(seen)
    return rows, failed


def _tally(seen: dict[str, StatusRecord]) -> tuple[int, int, int]:
    ok = [s for s in seen.values() if s.status == "ok"]
    return len(seen), sum(s.rows for s in ok), len(seen) - len(ok)


def summary_json(summary: DemoSummary) -> str:
    return json.dumps(asdict(summary))
