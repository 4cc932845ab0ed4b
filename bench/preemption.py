"""Preemption: what a spot interruption costs, and what checkpointing costs.

Run:  .venv/bin/python bench/preemption.py [--json] [--model tiny] [--interruptions 5]
      [--job-rows 40000] [--notice-poll-s 0.5] [--checkpoint-interval auto]
      [--leave-group always] [--overhead-model minilm] [--overhead-rows 1200]
      [--overhead-runs 2] [--keep]

Everything runs against its own embedded broker (Tansu) and real ``spotbatch worker``
processes; nothing else needs to be running. Two parts:

1. Interruptions (``--interruptions N`` rounds, model ``--model``). Per round: a fresh
   topic (1 partition) and consumer group, and TWO fresh non-burst workers, each with
   its own fake AWS IMDSv2 server (``FakeAws`` from spotbatch.fake_metadata, passed as
   ``--notice-source aws`` + ``SPOTBATCH_AWS_METADATA_URL``, polled every
   ``--notice-poll-s`` via ``SPOTBATCH_NOTICE_POLL_S``). Once the group has settled
   (one worker holds partition 0, the other holds nothing, and no rebalance line for
   0.5 s), ONE URI job of ``--job-rows`` rows (a JSONL file) is published. The bench
   reads the job's checkpoint ``<output>/_checkpoints/<job_id>.json`` every 10 ms:
   its ``owner`` names the worker that took the job up (A); the other one is B. When
   ``rows_done`` reaches ``--notice-at`` of the job, the bench waits a random
   0..``--notice-jitter-s`` (seeded) and publishes a spot ``terminate`` notice (2 min
   ahead, as AWS does) on A's fake IMDS only: t_notice. Then:

   * drain, notice -> exit: t_notice to the moment A's process is reaped (the bench
     polls every 10 ms). Split into detection (t_notice -> A's "notice from aws" log
     line; bounded by the poll interval), the rest, and the tail after A's "left the
     group" line (process teardown). ``usage_drain_s`` is A's own figure from its
     interruption record on ``spotbatch.usage`` (``_shutdown`` start to the usage
     record: steps 1-5 of the drain, without flush, group leave and exit).
   * rows recomputed: rows A ran through the model whose results never became
     durable, so that someone infers them again. Three views:
       - ``usage_rows_lost``: what A says (``rows_lost`` in its usage record);
       - ``checkpoint``: A's inferred rows (``rows`` in the same record; A is fresh, so
         all of them belong to this job) minus the rows A checkpointed (``rows_done``
         when B took the job up, from the checkpoint's ``attempt_history``);
       - ``total``: A's inferred rows + B's inferred rows (from B's usage record when
         the bench stops B after the job completed) minus the job's rows: every row
         inferred more than once, whoever redid it. This is the ground truth; the
         checkpoint view equals it when B redoes nothing that A had made durable.
   * resume, notice -> first new part: t_notice to the mtime of the first checkpoint
     save that shows B as ``owner`` with more rows done than when B took the job up
     (the save is an atomic rename of a file just written, so its mtime is the save
     instant). Split into A's drain (notice -> A exit), the rebalance (A exit -> B's
     ``assigned [0]`` log line) and B's first part (assigned -> that checkpoint:
     fetch, read the input file, plan, infer, write, checkpoint).

   The workers run with ``SPOTBATCH_LEAVE_GROUP=--leave-group``. The default here,
   ``always``, is what the worker's own default (``auto``) does on a real Kafka broker;
   on Tansu ``auto`` skips the LeaveGroup (a Tansu bug workaround), so B only gets the
   partition once A's session has expired: run ``--leave-group auto`` to see that.

   Once B has checkpointed its first new part (everything timed is over), the next
   round's two workers are started, so that they load and join while B finishes the
   job. Then B gets SIGTERM. After the last round every worker's exit is awaited and
   each round is checked: A and B exit 0; the job is complete (manifest present,
   ``rows`` = job rows, checkpoint complete) and its offset committed. A failed check
   exits 1 and keeps the work folder with the worker logs.

2. Checkpoint overhead (model ``--overhead-model``, ``--overhead-runs`` runs of each
   variant, ABBA order so drift in the machine's load hits both alike). Per run: a
   fresh topic and group, ONE URI job of ``--overhead-rows`` rows published first,
   then ONE ``spotbatch worker --burst`` process. rows/s = rows / (t_commit -
   t_assigned), as in bench/pipeline.py: from the worker's ``assigned [0]`` log line
   (model load and group join excluded) to the first committed-offset poll that sees
   the job committed (polled every 10 ms once the job's manifest exists). The worker
   gets SIGTERM then (rather than waiting out the 2 s burst idle check). Variants:

   * ``checkpointed``: ``--checkpoint-interval auto`` (the default);
   * ``one_part``: ``--checkpoint-interval 1000000rows``: the same job, the same input
     file, the same intake and batching, but cut into one part: one Parquet write and
     one checkpoint save at the end instead of one per part.

   ``checkpoint_overhead_ratio`` = rows/s(checkpointed) / rows/s(one_part), each side
   being all rows / all seconds over its runs; target >= 0.95. Why a one-part URI job
   rather than the same rows as inline jobs: inline jobs take another path (rows parsed
   from the Kafka record on the owner thread, no input file, a status record and an
   offset per small job), so their difference from a URI job would mix the cost of
   that path into the figure. The one-part URI job differs from the checkpointed one in
   exactly what checkpointing adds: cutting into parts, a Parquet write per part and a
   checkpoint save per part. (Its one big write at the end is a serial tail that the
   checkpointed run overlaps with inference; that is a real cost of not checkpointing
   and stays in.)

   Diagnostics per variant, from /proc between ``assigned`` and the commit: the
   inference thread's (the busiest: ``--torch-threads 1``) seconds runnable but waiting
   for a core (other processes on a shared machine), rows/s net of that wait, the
   worker's CPU seconds per 1000 rows, and the extra CPU per extra part.

   Note on ``auto``: the part size is fixed when a worker takes a job up, from Young's
   interval and the measured checkpoint cost and throughput. A fresh worker has measured
   neither, so it cuts its first job into parts of one batch (``--max-batch-rows``).
   Spot workers are often fresh (each interruption replaces one), so this case is
   measured; the part size used is printed.

The script never asserts on the figures; targets are reported as met / NOT met.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from procstat import proc_cpu_s, threads_sched  # bench/procstat.py

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # for tests.fake_metadata, where the package has no fakes
    sys.path.append(str(REPO_ROOT))

OVERHEAD_TARGET = 0.95
USAGE_TOPIC = "spotbatch.usage"  # the worker's default usage topic
_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_CHECKPOINT_POLL_S = 0.010
_OUTPUT_SCAN_S = 0.020
_COMMIT_POLL_S = 0.010
_SETTLE_QUIET_S = 0.5
_ONE_PART = "1000000rows"


# ---- inputs and jobs ---------------------------------------------------------------

def write_corpus(folder: Path, rows: int) -> Path:
    """A JSONL input file of ``rows`` rows (``id``, ``text``) from the demo corpus."""
    from spotbatch.demo import sample_corpus

    path = folder / f"rows-{rows}.jsonl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in sample_corpus(rows)))
    return path


def publish_uri_job(bootstrap: str, topic: str, job_id: str, model: str, path: Path) -> float:
    """Publish one URI job; returns the wall time once the broker acknowledged it."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        body = json.dumps({"job_id": job_id, "model": model, "inputs": {"uri": str(path)}}).encode()
        producer.send(topic, key=job_id.encode(), value=body).get(timeout=30)
    finally:
        producer.close()
    return time.time()


def new_topic(bootstrap: str, kind: str) -> tuple[str, str]:
    from spotbatch.kafka_admin import ensure_topics
    from spotbatch.workers.streams import dlq_topic, results_topic

    tag = uuid.uuid4().hex[:8]
    topic, group = f"bench.{kind}.{tag}", f"bench-{kind}-{tag}"
    ensure_topics(bootstrap, {topic: 1, results_topic(topic): 1, dlq_topic(topic): 1})
    return topic, group


# ---- worker processes --------------------------------------------------------------

@dataclass
class WorkerProc:
    name: str
    proc: subprocess.Popen
    log_path: Path
    t_spawn: float
    t_exit: float | None = None
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def worker_id(self) -> str:
        return f"{socket.gethostname()}-{self.proc.pid}"  # as Worker.worker_id

    def reap(self) -> bool:
        """True once exited (records the wall time it was first seen gone)."""
        if self.exit_code is None and self.proc.poll() is not None:
            self.t_exit, self.exit_code = time.time(), self.proc.returncode
        return self.exit_code is not None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return f"--- {self.name} (pid {self.pid}) {self.log_path}\n" + "\n".join(self.log_text().splitlines()[-lines:])


_LIVE: list[WorkerProc] = []


def spawn_worker(name: str, bootstrap: str, topic: str, group: str, model: str, output: Path, workdir: Path,
                 args: argparse.Namespace, extra: list[str], env: dict[str, str] | None = None,
                 session_timeout_ms: int | None = None) -> WorkerProc:
    cmd = [sys.executable, "-m", "spotbatch", "worker", "--bootstrap", bootstrap, "--topic", topic,
           "--group", group, "--model", model, "--output", str(output), "--input-prefix", str(workdir),
           "--torch-threads", str(args.torch_threads), "--max-batch-rows", str(args.batch_rows), *extra]
    if session_timeout_ms:
        cmd += ["--session-timeout-ms", str(session_timeout_ms)]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTBATCH_")}
    child_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        t_spawn = time.time()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env, cwd=workdir)
    w = WorkerProc(name, proc, log_path, t_spawn)
    _LIVE.append(w)
    return w


def kill_leftovers() -> None:
    """Kill (by pid) every worker this bench started that is still running."""
    for w in _LIVE:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)
    _LIVE.clear()


def log_events(text: str) -> list[tuple[float, str]]:
    """(wall time, line) for each timestamped log line."""
    out = []
    for line in text.splitlines():
        m = _LOG_TS.match(line)
        if m:
            out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), line))
    return out


_ASSIGNED = re.compile(r" assigned \[([\d, ]*)\]")
_REVOKED = re.compile(r" (revoked|lost) \[\d")


def last_assignment(w: WorkerProc) -> tuple[float, set[int] | None]:
    """(time of the last rebalance line, partitions of the last assignment; None if a
    revoke/loss came after it or there was none yet)."""
    last_t, parts = 0.0, None
    for t, line in log_events(w.log_text()):
        if m := _ASSIGNED.search(line):
            last_t, parts = t, {int(p) for p in m.group(1).replace(" ", "").split(",") if p}
        elif _REVOKED.search(line):
            last_t, parts = t, None
    return last_t, parts


def wait_settled(workers: list[WorkerProc], timeout_s: float) -> float:
    """Until every worker's last assignment is known, they split partition 0 between
    them, and no rebalance line was logged for _SETTLE_QUIET_S. Returns the seconds."""
    t0 = time.time()
    deadline = t0 + timeout_s
    while time.time() < deadline:
        states = [last_assignment(w) for w in workers]
        parts = [p for _, p in states]
        if all(p is not None for p in parts) and sorted(len(p) for p in parts) == [0, 1] \
                and set().union(*parts) == {0} and time.time() - max(t for t, _ in states) >= _SETTLE_QUIET_S:
            return time.time() - t0
        for w in workers:
            if w.reap():
                raise RuntimeError(f"{w.name} exited (code {w.exit_code}) before the group settled\n{w.tail()}")
        time.sleep(0.1)
    raise TimeoutError("group did not settle\n" + "\n".join(w.tail() for w in workers))


# ---- checkpoints -------------------------------------------------------------------

@dataclass
class Snapshot:
    t_seen: float
    mtime: float
    owner: str
    parts_done: int
    parts_total: int
    rows_done: int
    attempts: int
    complete: bool
    history: list[tuple[str, int]]  # (owner, rows_done when that attempt began), oldest first

    def takeup_rows(self, owner: str) -> int | None:
        """rows_done when ``owner`` last took the job up (from attempt_history)."""
        return next((rows for who, rows in reversed(self.history) if who == owner), None)


def read_checkpoint(path: Path) -> Snapshot | None:
    try:
        with open(path, "rb") as fh:  # fstat + read of one file: mtime and content agree
            mtime, doc = os.fstat(fh.fileno()).st_mtime, json.loads(fh.read())
    except (FileNotFoundError, ValueError):  # not yet written (saves are atomic renames)
        return None
    return Snapshot(time.time(), mtime, doc["owner"], len(doc["parts_done"]), doc["parts_total"],
                    doc["rows_done"], doc["attempts"], doc["complete"],
                    [(h["owner"], h["rows_done"]) for h in doc.get("attempt_history", [])])


def usage_records(bootstrap: str) -> dict[str, list[dict]]:
    """Interruption usage records on spotbatch.usage, by worker id."""
    from spotbatch.kafka_admin import read_all

    out: dict[str, list[dict]] = {}
    for rec in read_all(bootstrap, USAGE_TOPIC):
        body = json.loads(rec.value)
        if body.get("kind") == "interruption":
            out.setdefault(body["worker"], []).append(body)
    return out


# ---- part 1: interruptions -----------------------------------------------------------

def _fake_aws():
    try:  # the fakes moved into the package (the demo uses them); tests/ keeps a shim
        from spotbatch.testing.metadata import FakeAws
    except ImportError:
        from tests.fake_metadata import FakeAws
    return FakeAws()


@dataclass
class Pair:
    """One round's topic, group and two workers, each with its own fake AWS IMDSv2."""

    n: int
    topic: str
    group: str
    output: Path
    fakes: list
    workers: list[WorkerProc]

    def close(self) -> None:
        while self.fakes:
            self.fakes.pop().__exit__(None, None, None)


def start_pair(n: int, bootstrap: str, args: argparse.Namespace, workdir: Path) -> Pair:
    """Spawn the two workers of round ``n`` (returns at once; wait_settled waits)."""
    topic, group = new_topic(bootstrap, "preempt")
    output = workdir / f"round-{n}"
    extra = ["--notice-source", "aws", "--checkpoint-interval", args.checkpoint_interval]
    if args.drain_s is not None:
        extra += ["--drain-s", str(args.drain_s)]
    fakes = [_fake_aws().__enter__() for _ in range(2)]
    leave = {"SPOTBATCH_LEAVE_GROUP": args.leave_group}
    workers = [spawn_worker(f"round{n}-w{i}", bootstrap, topic, group, args.model, output, workdir, args, extra,
                            env={"SPOTBATCH_AWS_METADATA_URL": fake.url,
                                 "SPOTBATCH_NOTICE_POLL_S": str(args.notice_poll_s), **leave},
                            session_timeout_ms=args.session_timeout_ms)
               for i, fake in enumerate(fakes)]
    return Pair(n, topic, group, output, fakes, workers)


@dataclass
class Observed:
    """What the bench saw of one round while it ran."""

    a: WorkerProc  # interrupted
    b: WorkerProc  # resumer
    job_id: str
    settle_s: float
    trigger_rows: int
    t_publish: float
    t_notice: float
    t_done: float
    at_takeup: Snapshot  # A's first checkpoint save (its take-up)
    at_notice: Snapshot  # the last checkpoint read before the notice
    first_new: Snapshot | None  # B's first save with a new part
    last: Snapshot  # the final checkpoint


def interruption_round(pair: Pair, bootstrap: str, args: argparse.Namespace, corpus: Path, rng: random.Random,
                       prepare_next: Callable[[], None]) -> Callable[[dict], dict[str, Any]]:
    """One interruption, up to the job's completion; then SIGTERMs the resumer and returns
    a function that checks the round and computes its figures from the usage records.

    Calls ``prepare_next`` once the timed part is over (the other worker checkpointed its
    first part), so that the next pair starts and joins while this round ends.
    """
    n, workers, fakes, output = pair.n, pair.workers, pair.fakes, pair.output
    job_id = f"preempt-{n}"
    cp_path = output / "_checkpoints" / f"{job_id}.json"
    settle_s = wait_settled(workers, args.timeout_s)
    t_publish = publish_uri_job(bootstrap, pair.topic, job_id, args.model, corpus)

    deadline = time.monotonic() + args.timeout_s
    a = b = a_fake = None
    at_takeup = at_exit = first_new = last = None
    t_notice = notice_due = at_notice = None
    trigger_rows = math.ceil(args.notice_at * args.job_rows)
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"round {n}: stuck (last checkpoint {last})\n" + "\n".join(w.tail() for w in workers))
        snap = read_checkpoint(cp_path)
        last = snap or last
        if snap and a is None:
            by_id = {w.worker_id: (w, f) for w, f in zip(workers, fakes)}
            if snap.owner not in by_id:
                raise RuntimeError(f"round {n}: checkpoint owner {snap.owner!r} is neither worker")
            a, a_fake = by_id[snap.owner]
            b = next(w for w in workers if w is not a)
            at_takeup = snap
        if a is not None and t_notice is None:
            if notice_due is None and snap and snap.rows_done >= trigger_rows:
                notice_due = time.time() + rng.uniform(0.0, args.notice_jitter_s)
            if notice_due is not None and time.time() >= notice_due:
                a_fake.notice(action="terminate", in_s=120)  # AWS gives two minutes
                t_notice = time.time()
                at_notice = last
        if snap and b is not None and first_new is None and t_notice is not None and snap.owner == b.worker_id \
                and snap.rows_done > snap.takeup_rows(b.worker_id):
            first_new = snap  # B's first part after taking the job up: the timed part is over
            prepare_next()
        for w in workers:
            w.reap()
        if b is not None and b.exit_code is not None:
            raise RuntimeError(f"round {n}: the standby worker exited (code {b.exit_code})\n{b.tail()}")
        if a is not None and a.exit_code is not None:
            if t_notice is None:
                raise RuntimeError(f"round {n}: worker {a.name} exited before the notice\n{a.tail()}")
            if at_exit is None:
                at_exit = read_checkpoint(cp_path)
                if at_exit.complete and at_exit.owner == a.worker_id:
                    raise RuntimeError(f"round {n}: the job finished before the worker left: raise "
                                       f"--job-rows or lower --notice-at / --notice-poll-s")
            if snap and snap.complete and (output / job_id / "_manifest.json").exists():
                break
        time.sleep(_CHECKPOINT_POLL_S)
    t_done = time.time()
    b.proc.send_signal(signal.SIGTERM)  # the job is done; B leaves (its usage record holds its rows)
    seen = Observed(a, b, job_id, settle_s, trigger_rows, t_publish, t_notice, t_done, at_takeup, at_notice,
                    first_new, last)
    return lambda usage: finish_round(pair, seen, bootstrap, args, usage)


def finish_round(pair: Pair, seen: Observed, bootstrap: str, args: argparse.Namespace,
                 usage: dict[str, list[dict]]) -> dict[str, Any]:
    """Checks and figures of one round, once its resumer has exited and usage is read."""
    from spotbatch.kafka_admin import committed_offsets

    n, output, job_id, a, b = pair.n, pair.output, seen.job_id, seen.a, seen.b
    first_new, last, at_takeup, at_notice, t_notice = seen.first_new, seen.last, seen.at_takeup, seen.at_notice, seen.t_notice
    problems = []
    for w in (a, b):
        if w.exit_code != 0:
            problems.append(f"{w.name} exit code {w.exit_code}")
    manifest = json.loads((output / job_id / "_manifest.json").read_text())
    if manifest["rows"] != args.job_rows:
        problems.append(f"manifest rows {manifest['rows']} != {args.job_rows}")
    if committed_offsets(bootstrap, pair.group, pair.topic).get(0, 0) < 1:
        problems.append("the job's offset was not committed")
    a_usage, b_usage = (usage.get(w.worker_id, [None])[0] for w in (a, b))
    if a_usage is None or b_usage is None:
        problems.append(f"usage records missing (A: {a_usage is not None}, B: {b_usage is not None})")
    if first_new is None:
        problems.append("never saw the other worker checkpoint a new part")
    if problems:
        raise RuntimeError(f"round {n} failed: {'; '.join(problems)}\n{a.tail()}\n{b.tail()}")

    a_events, b_events = log_events(a.log_text()), log_events(b.log_text())
    t_detect = next((t for t, line in a_events if "notice from aws" in line), None)
    t_left = next((t for t, line in a_events if " left the group after " in line), None)
    t_b_assigned = next((t for t, line in b_events if t >= t_notice - 0.001 and _ASSIGNED.search(line)
                         and "[0]" in line), None)
    # What A left durable = the progress B found when it took the job up (attempt_history).
    a_left = last.takeup_rows(b.worker_id)
    a_durable = a_left - last.takeup_rows(a.worker_id)
    part_rows = math.ceil(args.job_rows / at_takeup.parts_total)
    t_resume = min(first_new.mtime, first_new.t_seen)

    def d(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else round(x - y, 3)

    return {
        "round": n, "job_rows": args.job_rows, "parts_total": at_takeup.parts_total, "part_rows": part_rows,
        "group_settle_s": round(seen.settle_s, 2),
        "notice_at_rows_done": seen.trigger_rows, "rows_done_at_exit": a_left,
        "drain": {
            "notice_to_exit_s": d(a.t_exit, t_notice),
            "notice_to_detected_s": d(t_detect, t_notice),
            "detected_to_exit_s": d(a.t_exit, t_detect),
            "usage_drain_s": a_usage["drain_s"],
            "left_group_to_exit_s": d(a.t_exit, t_left),
            "reason": a_usage["reason"],
        },
        "rows_recomputed": {
            "usage_rows_lost": a_usage["rows_lost"],
            "units_abandoned": a_usage.get("units_abandoned"),
            "checkpoint": a_usage["rows"] - a_durable,
            "total": a_usage["rows"] + b_usage["rows"] - args.job_rows,
            "a_rows_inferred": a_usage["rows"], "a_rows_checkpointed": a_durable,
            "b_rows_inferred": b_usage["rows"],
        },
        "resume": {
            "notice_to_first_new_part_s": d(t_resume, t_notice),
            "notice_to_a_exit_s": d(a.t_exit, t_notice),
            "a_exit_to_b_assigned_s": d(t_b_assigned, a.t_exit),
            "b_assigned_to_first_part_s": d(t_resume, t_b_assigned),
            "attempts": last.attempts,
        },
        "job_seconds_publish_to_complete": round(seen.t_done - seen.t_publish, 2),
        # A's pace before the notice: rows checkpointed / time since it took the job up
        "a_rows_per_s_before_notice": round((at_notice.rows_done - at_takeup.rows_done)
                                            / max(1e-6, at_notice.mtime - at_takeup.mtime), 1),
        "workers": {"interrupted": a.name, "resumer": b.name},
    }


def interruptions(bootstrap: str, args: argparse.Namespace, corpus: Path, workdir: Path,
                  say: Callable[[str], None]) -> list[dict]:
    rng = random.Random(args.seed)
    finishers: list[Callable[[dict], dict]] = []
    pairs: dict[int, Pair] = {0: start_pair(0, bootstrap, args, workdir)}
    try:
        for n in range(args.interruptions):
            def prepare_next(n: int = n) -> None:
                if n + 1 < args.interruptions and n + 1 not in pairs:
                    pairs[n + 1] = start_pair(n + 1, bootstrap, args, workdir)

            finishers.append(interruption_round(pairs[n], bootstrap, args, corpus, rng, prepare_next))
            say(f"    round {n} done")
        for pair in pairs.values():  # the resumers were sent SIGTERM; their usage records follow
            for w in pair.workers:
                try:
                    w.proc.wait(args.timeout_s)
                except subprocess.TimeoutExpired:
                    raise TimeoutError(f"{w.name} did not exit after SIGTERM\n{w.tail()}") from None
                w.reap()
        usage = usage_records(bootstrap)
        rounds = [finish(usage) for finish in finishers]
        for r in rounds:
            say(f"    round {r['round']}: notice->exit {r['drain']['notice_to_exit_s']} s (drain_s "
                f"{r['drain']['usage_drain_s']}), recomputed {r['rows_recomputed']['total']} rows "
                f"(rows_lost {r['rows_recomputed']['usage_rows_lost']}), notice->resume "
                f"{r['resume']['notice_to_first_new_part_s']} s")
    finally:
        for pair in pairs.values():
            pair.close()
    return rounds


# ---- part 2: checkpoint overhead ------------------------------------------------------

def overhead_run(variant: str, interval: str, bootstrap: str, args: argparse.Namespace, corpus: Path,
                 workdir: Path, index: int) -> dict[str, Any]:
    from kafka.admin import KafkaAdminClient

    topic, group = new_topic(bootstrap, f"overhead-{variant}")
    output = workdir / f"overhead-{index}-{variant}"
    job_id = f"overhead-{index}"
    publish_uri_job(bootstrap, topic, job_id, args.overhead_model, corpus)
    manifest = output / job_id / "_manifest.json"
    # The group join is outside the timed interval: a short session makes Tansu join sooner.
    w = spawn_worker(f"overhead-{index}-{variant}", bootstrap, topic, group, args.overhead_model, output, workdir,
                     args, ["--burst", "--notice-source", "signal", "--checkpoint-interval", interval],
                     session_timeout_ms=args.session_timeout_ms or 6000)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-commit-probe", request_timeout_ms=10_000)
    t_commit = at_assign = at_commit = None
    last_negative = w.t_spawn
    deadline = time.monotonic() + args.timeout_s
    try:
        while not w.reap():
            if time.monotonic() > deadline:
                raise TimeoutError(f"overhead run {variant}: worker still running\n{w.tail()}")
            if at_assign is None and b" assigned [0]" in w.log_path.read_bytes():
                at_assign = (proc_cpu_s(w.pid), threads_sched(w.pid))  # within ~20 ms of the log line
            if t_commit is None:
                if manifest.exists():
                    sent = time.time()
                    offsets = admin.list_group_offsets(group).get(group, {})
                    if any(tp.topic == topic and m.offset >= 1 for tp, m in offsets.items()):
                        t_commit = time.time()
                        at_commit = (proc_cpu_s(w.pid), threads_sched(w.pid))
                        # Measured: stop now rather than wait for the 2 s burst idle check.
                        w.proc.send_signal(signal.SIGTERM)
                    else:
                        last_negative = sent
                    time.sleep(_COMMIT_POLL_S)
                    continue
                last_negative = time.time()
            time.sleep(_OUTPUT_SCAN_S if t_commit is None else _COMMIT_POLL_S)
    finally:
        admin.close()
    events = log_events(w.log_text())
    t_assigned = next((t for t, line in events if _ASSIGNED.search(line) and "[0]" in line), None)
    cp = read_checkpoint(output / "_checkpoints" / f"{job_id}.json")
    problems = []
    if w.exit_code != 0:
        problems.append(f"exit code {w.exit_code}")
    if t_commit is None or t_assigned is None:
        problems.append("no commit seen" if t_commit is None else "no 'assigned [0]' line")
    if not manifest.exists() or json.loads(manifest.read_text())["rows"] != args.overhead_rows:
        problems.append("manifest missing or wrong row count")
    if cp is None or not cp.complete:
        problems.append("checkpoint missing or incomplete")
    if problems:
        raise RuntimeError(f"overhead run {variant} failed: {'; '.join(problems)}\n{w.tail()}")
    seconds = t_commit - t_assigned
    threads = _thread_deltas(seconds, at_assign[1], at_commit[1]) if at_assign and at_commit else []
    inference = threads[0] if threads else None  # busiest thread: inference (with --torch-threads 1)
    return {"variant": variant, "checkpoint_interval": interval, "rows": args.overhead_rows,
            "seconds": round(seconds, 3), "rows_per_s": round(args.overhead_rows / seconds, 1),
            "parts": cp.parts_total, "part_rows": math.ceil(args.overhead_rows / cp.parts_total),
            "commit_probe_uncertainty_s": round(t_commit - last_negative, 3),
            "model_load_and_join_s": round(t_assigned - w.t_spawn, 2),
            "cpu_s": round(at_commit[0] - at_assign[0], 2) if at_assign and at_commit else None,
            "inference_thread": inference, "other_threads_cpu_s": round(sum(t["on_cpu_s"] for t in threads[1:]), 2)}


def _thread_deltas(wall_s: float, before: dict, after: dict) -> list[dict]:
    """Per thread over the window, busiest first: on CPU / waiting for a CPU / off CPU."""
    rows = []
    for tid, (on1, wait1) in after.items():
        on0, wait0 = before.get(tid, (0.0, 0.0))
        on, wait = on1 - on0, wait1 - wait0
        if on > 0.005:
            rows.append({"tid": tid, "on_cpu_s": round(on, 2), "waiting_for_cpu_s": round(wait, 2),
                         "off_cpu_s": round(max(0.0, wall_s - on - wait), 2)})
    return sorted(rows, key=lambda r: -r["on_cpu_s"])


def overhead(bootstrap: str, args: argparse.Namespace, corpus: Path, workdir: Path,
             say: Callable[[str], None]) -> dict[str, Any]:
    variants = {"checkpointed": args.checkpoint_interval, "one_part": _ONE_PART}
    runs: list[dict] = []
    for r in range(args.overhead_runs):
        order = ["checkpointed", "one_part"] if r % 2 == 0 else ["one_part", "checkpointed"]  # ABBA
        for v in order:
            run = overhead_run(v, variants[v], bootstrap, args, corpus, workdir, len(runs))
            runs.append(run)
            say(f"    {v:12s} {run['rows_per_s']:8.1f} rows/s  ({run['parts']} parts of {run['part_rows']} rows, "
                f"{run['seconds']} s)")
    agg = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        rows, secs = sum(r["rows"] for r in mine), sum(r["seconds"] for r in mine)
        waits = [r["inference_thread"]["waiting_for_cpu_s"] for r in mine if r["inference_thread"]]
        cpus = [r["cpu_s"] for r in mine if r["cpu_s"] is not None]
        agg[v] = {"rows_per_s": round(rows / secs, 1),
                  "runs_rows_per_s": [r["rows_per_s"] for r in mine],
                  # rows/s had the inference thread never waited for a core (the machine's other load)
                  "rows_per_s_net_of_cpu_wait": round(rows / (secs - sum(waits)), 1) if len(waits) == len(mine) else None,
                  "inference_waiting_for_cpu_s": round(sum(waits), 2) if len(waits) == len(mine) else None,
                  "cpu_s_per_1000_rows": round(1000 * sum(cpus) / rows, 2) if len(cpus) == len(mine) else None,
                  "parts": mine[0]["parts"], "part_rows": mine[0]["part_rows"]}
    c, o = agg["checkpointed"], agg["one_part"]
    ratio = round(c["rows_per_s"] / o["rows_per_s"], 3)
    net = round(c["rows_per_s_net_of_cpu_wait"] / o["rows_per_s_net_of_cpu_wait"], 3) \
        if c["rows_per_s_net_of_cpu_wait"] and o["rows_per_s_net_of_cpu_wait"] else None
    extra_cpu = None
    if c["cpu_s_per_1000_rows"] is not None and o["cpu_s_per_1000_rows"] is not None and c["parts"] > o["parts"]:
        # CPU seconds the checkpointed runs spent beyond the one-part runs, per extra part
        extra_cpu = round((c["cpu_s_per_1000_rows"] - o["cpu_s_per_1000_rows"]) * args.overhead_rows / 1000
                          / (c["parts"] - o["parts"]) * 1000, 1)
    return {"ratio": ratio, "ratio_net_of_cpu_wait": net, "target": OVERHEAD_TARGET, "met": ratio >= OVERHEAD_TARGET,
            "extra_cpu_ms_per_part": extra_cpu, "by_variant": agg, "runs": runs}


# ---- report ---------------------------------------------------------------------------

def _stats(values: list) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"p50": None, "max": None, "mean": None, "values": values}
    return {"p50": round(statistics.median(vals), 3), "max": max(vals), "mean": round(statistics.fmean(vals), 3),
            "values": values}


def build_report(args: argparse.Namespace, rounds: list[dict], ovh: dict | None) -> dict[str, Any]:
    def col(section: str, key: str) -> list:
        return [r[section][key] for r in rounds]

    return {
        "checkpoint_overhead_ratio": ovh["ratio"] if ovh else None,
        "drain_notice_to_exit_s": _stats(col("drain", "notice_to_exit_s")),
        "drain_usage_drain_s": _stats(col("drain", "usage_drain_s")),
        "drain_notice_to_detected_s": _stats(col("drain", "notice_to_detected_s")),
        "drain_detected_to_exit_s": _stats(col("drain", "detected_to_exit_s")),
        "drain_left_group_to_exit_s": _stats(col("drain", "left_group_to_exit_s")),
        "rows_recomputed_total": _stats(col("rows_recomputed", "total")),
        "rows_recomputed_checkpoint": _stats(col("rows_recomputed", "checkpoint")),
        "rows_recomputed_usage_rows_lost": _stats(col("rows_recomputed", "usage_rows_lost")),
        "resume_notice_to_first_new_part_s": _stats(col("resume", "notice_to_first_new_part_s")),
        "resume_a_exit_to_b_assigned_s": _stats(col("resume", "a_exit_to_b_assigned_s")),
        "resume_b_assigned_to_first_part_s": _stats(col("resume", "b_assigned_to_first_part_s")),
        "checkpoint_overhead": ovh,
        "config": {
            "model": args.model, "interruptions": args.interruptions, "job_rows": args.job_rows,
            "batch_rows": args.batch_rows, "checkpoint_interval": args.checkpoint_interval,
            "part_rows": rounds[0]["part_rows"] if rounds else None,
            "notice_poll_s": args.notice_poll_s, "notice_at": args.notice_at, "notice_jitter_s": args.notice_jitter_s,
            "drain_s": args.drain_s if args.drain_s is not None else "worker default",
            "session_timeout_ms": args.session_timeout_ms or "worker default",
            "leave_group": args.leave_group,
            "torch_threads": args.torch_threads, "seed": args.seed,
            "overhead_model": args.overhead_model, "overhead_rows": args.overhead_rows,
            "overhead_runs": args.overhead_runs, "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "loadavg_1m_at_start": args.loadavg_start, "loadavg_1m_at_end": _loadavg(),
        },
        "warnings": _warnings(rounds, ovh),
        "rounds": rounds,
    }


def _warnings(rounds: list[dict], ovh: dict | None) -> list[str]:
    out = []
    gaps = [r["rows_recomputed"]["total"] - r["rows_recomputed"]["usage_rows_lost"] for r in rounds]
    if any(g > 0 for g in gaps):
        out.append(f"the usage record's rows_lost is below the rows actually recomputed in "
                   f"{sum(g > 0 for g in gaps)}/{len(rounds)} interruptions (by up to {max(gaps)} rows)")
    if any(r["rows_recomputed"]["checkpoint"] != r["rows_recomputed"]["total"] for r in rounds):
        out.append("in some rounds the resumer redid rows the interrupted worker had checkpointed")
    if ovh:
        share = {}
        for v in ("checkpointed", "one_part"):
            mine = [r for r in ovh["runs"] if r["variant"] == v]
            waits = [r["inference_thread"]["waiting_for_cpu_s"] for r in mine if r["inference_thread"]]
            if len(waits) == len(mine):
                share[v] = sum(waits) / sum(r["seconds"] for r in mine)
        if len(share) == 2 and abs(share["checkpointed"] - share["one_part"]) > 0.05:
            out.append(f"the inference thread waited for a core {share['checkpointed']:.0%} (checkpointed) vs "
                       f"{share['one_part']:.0%} (one_part) of the time: other load on the machine differed "
                       "between the variants; ratio_net_of_cpu_wait is the steadier figure")
    return out


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)  # tables stay readable in a pipe or file
    cfg = report["config"]

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    if report["rounds"]:
        t = Table(title=f"interruptions: {cfg['interruptions']} x one URI job of {cfg['job_rows']} rows "
                        f"({cfg['model']}, parts of {cfg['part_rows']} rows, notice poll {cfg['notice_poll_s']} s)")
        for c in ("figure", "p50", "max", "mean", "note"):
            t.add_column(c, justify="left" if c in ("figure", "note") else "right")
        rows = [
            ("drain: notice -> exit (s)", "drain_notice_to_exit_s", "fake IMDS notice published -> process reaped"),
            ("  notice -> detected (s)", "drain_notice_to_detected_s", "bounded by the notice poll interval"),
            ("  detected -> exit (s)", "drain_detected_to_exit_s", "the worker's part"),
            ("  worker's own drain_s", "drain_usage_drain_s", "usage record: _shutdown steps 1-5"),
            ("  left group -> exit (s)", "drain_left_group_to_exit_s", "after the 'left the group' line"),
            ("rows recomputed (total)", "rows_recomputed_total", "A inferred + B inferred - job rows"),
            ("  from checkpoints", "rows_recomputed_checkpoint", "A inferred - rows A checkpointed"),
            ("  usage rows_lost", "rows_recomputed_usage_rows_lost", "what the worker reports"),
            ("resume: notice -> new part (s)", "resume_notice_to_first_new_part_s", "other worker's first checkpoint"),
            ("  A exit -> B assigned (s)", "resume_a_exit_to_b_assigned_s", "the group's rebalance"),
            ("  B assigned -> part (s)", "resume_b_assigned_to_first_part_s", "fetch, read, plan, infer, write, save"),
        ]
        for label, key, note in rows:
            s = report[key]
            t.add_row(label, fmt(s["p50"]), fmt(s["max"]), fmt(s["mean"]), note)
        console.print(t)
        r = Table(title="per interruption")
        for c in ("round", "notice->exit", "detect", "drain_s", "recomputed", "ckpt view", "rows_lost",
                  "notice->resume", "rebalance", "first part", "rows done at exit"):
            r.add_column(c, justify="right")
        for x in report["rounds"]:
            r.add_row(str(x["round"]), fmt(x["drain"]["notice_to_exit_s"]), fmt(x["drain"]["notice_to_detected_s"]),
                      fmt(x["drain"]["usage_drain_s"]), str(x["rows_recomputed"]["total"]),
                      str(x["rows_recomputed"]["checkpoint"]), str(x["rows_recomputed"]["usage_rows_lost"]),
                      fmt(x["resume"]["notice_to_first_new_part_s"]), fmt(x["resume"]["a_exit_to_b_assigned_s"]),
                      fmt(x["resume"]["b_assigned_to_first_part_s"]), f"{x['rows_done_at_exit']}/{x['job_rows']}")
        console.print(r)
    ovh = report["checkpoint_overhead"]
    if ovh:
        o = Table(title=f"checkpoint overhead ({cfg['overhead_model']}, one URI job of {cfg['overhead_rows']} rows, "
                        f"{cfg['overhead_runs']} run(s) each, ABBA)")
        for c in ("variant", "interval", "rows/s", "runs", "parts", "part rows", "net of CPU wait",
                  "inference waited for CPU (s)", "CPU s / 1000 rows"):
            o.add_column(c, justify="left" if c in ("variant", "interval") else "right")
        for v, interval in (("checkpointed", cfg["checkpoint_interval"]), ("one_part", _ONE_PART)):
            a = ovh["by_variant"][v]
            o.add_row(v, interval, f"{a['rows_per_s']:.1f}", ", ".join(f"{x:.1f}" for x in a["runs_rows_per_s"]),
                      str(a["parts"]), str(a["part_rows"]), fmt(a["rows_per_s_net_of_cpu_wait"]),
                      fmt(a["inference_waiting_for_cpu_s"]), fmt(a["cpu_s_per_1000_rows"]))
        console.print(o)
        flag = "[green]met[/green]" if ovh["met"] else "[red]NOT met[/red]"
        console.print(f"checkpoint_overhead_ratio = checkpointed / one_part = {ovh['ratio']:.3f} "
                      f"(target >= {ovh['target']}: {flag}); net of CPU wait {fmt(ovh['ratio_net_of_cpu_wait'])}; "
                      f"extra CPU per part {fmt(ovh['extra_cpu_ms_per_part'])} ms")
    console.print(f"config: {json.dumps(cfg)}")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")


# ---- main -------------------------------------------------------------------------------

def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (progress off)")
    ap.add_argument("--model", default="tiny", help="model of the interruption rounds (tiny, minilm)")
    ap.add_argument("--interruptions", type=int, default=5, help="interruption rounds; 0 skips them")
    ap.add_argument("--job-rows", type=int, default=None,
                    help="rows of each round's URI job (default: 40000 for tiny, 2000 otherwise)")
    ap.add_argument("--notice-at", type=float, default=0.2, help="notice once this fraction of the job is checkpointed")
    ap.add_argument("--notice-jitter-s", type=float, default=0.5, help="then after a random 0..this many seconds")
    ap.add_argument("--notice-poll-s", type=float, default=0.5, help="workers' SPOTBATCH_NOTICE_POLL_S")
    ap.add_argument("--drain-s", type=float, default=None, help="worker --drain-s (default: the worker's)")
    ap.add_argument("--checkpoint-interval", default="auto", help="worker --checkpoint-interval under test")
    ap.add_argument("--batch-rows", type=int, default=64, help="worker --max-batch-rows")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--session-timeout-ms", type=int, default=None, help="worker flag (default: the worker's)")
    ap.add_argument("--leave-group", choices=("auto", "always", "never"), default="always",
                    help="workers' SPOTBATCH_LEAVE_GROUP in the rounds. 'always' (default here) is what the "
                         "worker's 'auto' does on a real Kafka broker; 'auto' skips the LeaveGroup on Tansu, "
                         "so the resumer waits for the interrupted worker's session to expire")
    ap.add_argument("--overhead-model", default="minilm", help="model of the checkpoint overhead runs")
    ap.add_argument("--overhead-rows", type=int, default=1200, help="rows of the overhead job; 0 skips part 2")
    ap.add_argument("--overhead-runs", type=int, default=2, help="runs of each variant (ABBA order)")
    ap.add_argument("--seed", type=int, default=7, help="seeds the notice jitter")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per round / per run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (outputs, checkpoints, worker logs)")
    args = ap.parse_args(argv)
    if args.job_rows is None:
        args.job_rows = 40000 if args.model == "tiny" else 2000
    if not 0 < args.notice_at < 1:
        ap.error("--notice-at must be between 0 and 1")
    if min(args.job_rows, args.batch_rows, args.torch_threads, args.overhead_runs) < 1 or args.interruptions < 0:
        ap.error("--job-rows, --batch-rows, --torch-threads, --overhead-runs must be >= 1; --interruptions >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spotbatch.embedded import EmbeddedBroker
    from spotbatch.kafka_admin import ensure_topics

    args.loadavg_start = _loadavg()
    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    workdir = Path(tempfile.mkdtemp(prefix="spotbatch-preempt-"))
    rounds: list[dict] = []
    ovh = None
    try:
        with EmbeddedBroker() as broker:
            ensure_topics(broker.bootstrap, {USAGE_TOPIC: 1})
            say(f"broker {broker.bootstrap}; work dir {workdir}")
            if args.interruptions:
                corpus = write_corpus(workdir / "inputs", args.job_rows)
                say(f"(1) {args.interruptions} interruptions: {args.model}, one URI job of {args.job_rows} rows each, "
                    f"two workers per round")
                rounds = interruptions(broker.bootstrap, args, corpus, workdir, say)
            if args.overhead_rows > 0:
                corpus = write_corpus(workdir / "inputs", args.overhead_rows)
                say(f"(2) checkpoint overhead: {args.overhead_model}, one URI job of {args.overhead_rows} rows, "
                    f"{args.overhead_runs} run(s) of each variant")
                ovh = overhead(broker.bootstrap, args, corpus, workdir, say)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}\n(work folder with worker logs kept: {workdir})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        kill_leftovers()
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(args, rounds, ovh)
    if args.json:
        print(json.dumps(report))
    else:
        print_tables(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
