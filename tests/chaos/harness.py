"""The chaos suite's machinery: a seeded workload, its clean reference outputs, a
supervisor that interrupts and restarts worker processes, a TCP proxy that cuts the
broker connection, an HTTP proxy that makes S3 fail, and the inference-log accounting
of recomputed rows. The test modules beside this file hold the scenarios.

Worker processes come from tests/integration/helpers.spawn_worker (``python -m
spotbatch worker``). The only additions, through shim/sitecustomize.py on the worker's
PYTHONPATH and only when a test asks for them by env: the inference log (which rows
each process ran through the model) and two single-shot faults (a retriable error
from ``KafkaConsumer.poll``, a timeout from ``KafkaProducer.flush``).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import re
import socket
import struct
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from kafka import KafkaProducer
from kafka.errors import KafkaError

from spotbatch.embedded import EmbeddedBroker
from spotbatch.kafka_admin import committed_offsets
from spotbatch.storage import join_uri
from spotbatch.testing.store import MemoryStore
from spotbatch.workers.sinks import ParquetSink
from spotbatch.workers.versions import Served
from tests.fake_metadata import FakeAws
from tests.integration.helpers import REPO_ROOT, WorkerProc, expected_embeddings, spawn_worker

TINY = Served("tiny", None, "builtin")  # what the workers serve: the metadata their outputs carry

__all__ = [
    "SEED_ENV", "DEFAULT_SEED", "CHECKPOINT_ROWS", "BATCH_ROWS", "CHAOS_WORKER_ARGS", "SHIM_DIR", "INFERENCE_LOG_ENV", "INTERRUPTIONS", "chaos_seed",
    "GoodJob", "BadJob", "Workload", "build_workload", "reference_outputs",
    "verify_outputs", "verify_dead_letters", "verify_statuses", "checkpoint_uri", "local_objects", "s3_objects",
    "TricklePublisher", "publish_all", "log_ends_of", "wait_committed",
    "Life", "Supervisor", "RecomputeReport", "recompute_report",
    "TcpProxy", "advertised_broker", "S3FaultProxy", "table",
]

SEED_ENV = "SPOTBATCH_CHAOS_SEED"
DEFAULT_SEED = 20240611
# Every scenario's workers: small parts and batches, so interruptions land mid-job often.
CHECKPOINT_ROWS, BATCH_ROWS = 20, 10
CHAOS_WORKER_ARGS = ["--checkpoint-interval", f"{CHECKPOINT_ROWS}rows", "--max-batch-rows", str(BATCH_ROWS)]
SHIM_DIR = Path(__file__).resolve().parent / "shim"
INFERENCE_LOG_ENV = "SPOTBATCH_TEST_INFERENCE_LOG"


def chaos_seed() -> int:
    """The run's seed: $SPOTBATCH_CHAOS_SEED, else a fixed default (replay a failure with it)."""
    raw = os.environ.get(SEED_ENV, "").strip()
    return int(raw) if raw else DEFAULT_SEED


# ---- the workload ------------------------------------------------------------------

_WORDS = ("spot", "batch", "kafka", "parquet", "torch", "gpu", "drain", "notice", "part", "row",
          "checkpoint", "offset", "commit", "moto", "tansu", "embedding", "zebra", "ünïcode", "日本")


def row_text(rng: random.Random, job_id: str, row_id: str) -> str:
    """``<job_id>|<row_id> words...``: unique per row, so the inference log names the row."""
    return f"{job_id}|{row_id} " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12)))


@dataclass(frozen=True)
class GoodJob:
    job_id: str
    kind: str  # "inline" | "uri"
    ids: tuple[str, ...]
    texts: tuple[str, ...]
    value: bytes
    parts_total: int = 0  # uri jobs: ceil(rows / part_rows)
    part_rows: int = 0  # uri jobs: rows per part (the checkpoint interval in rows), the last part shorter

    @property
    def key(self) -> bytes:
        return self.job_id.encode()

    def row_keys(self) -> list[str]:
        return [t.split(" ", 1)[0] for t in self.texts]


@dataclass(frozen=True)
class BadJob:
    name: str
    value: bytes
    code: str  # the error code the DLQ record must carry

    @property
    def key(self) -> bytes:
        return self.name.encode()


@dataclass
class Workload:
    good: list[GoodJob]
    bad: list[BadJob]
    inputs: dict[str, bytes]  # URI -> bytes of the input files to create first
    order: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value) in publish order

    @property
    def inline(self) -> list[GoodJob]:
        return [j for j in self.good if j.kind == "inline"]

    @property
    def uri(self) -> list[GoodJob]:
        return [j for j in self.good if j.kind == "uri"]

    def __add__(self, other: Workload) -> Workload:
        return Workload(self.good + other.good, self.bad + other.bad, {**self.inputs, **other.inputs},
                        self.order + other.order)

    def summary(self) -> str:
        parts = sum(j.parts_total for j in self.uri)
        rows = sum(len(j.ids) for j in self.good)
        return (f"{len(self.good) + len(self.bad)} ({len(self.inline)} inline, {len(self.uri)} uri in "
                f"{parts} parts, {len(self.bad)} bad); {rows} good rows")


def _job(job_id: str, inputs: dict, *, model: str = "tiny", **extra) -> bytes:
    return json.dumps({"version": 1, "job_id": job_id, "model": model, "inputs": inputs, **extra}).encode()


def _jsonl(ids: Iterable[str], texts: Iterable) -> bytes:
    return "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts)).encode()


def build_workload(rng: random.Random, *, name: str, n_inline: int, n_uri: int, uri_rows: tuple[int, int],
                   checkpoint_rows: int, input_prefix: str, output_root: str, bad: bool = True) -> Workload:
    """Inline jobs of 2-5 rows, URI jobs (JSONL under ``input_prefix``) of ``uri_rows``
    rows, and, with ``bad``, one job per kind of bad input; publish order shuffled."""
    good, inputs = [], {}
    for n in range(n_inline):
        job_id = f"{name}-i{n:04d}"
        ids = tuple(f"r{k}" for k in range(rng.randint(2, 5)))
        texts = tuple(row_text(rng, job_id, i) for i in ids)
        value = _job(job_id, {"rows": [{"id": i, "text": t} for i, t in zip(ids, texts)]})
        good.append(GoodJob(job_id, "inline", ids, texts, value))
    for n in range(n_uri):
        job_id = f"{name}-u{n:02d}"
        rows = rng.randint(*uri_rows)
        ids = tuple(f"u{k:05d}" for k in range(rows))
        texts = tuple(row_text(rng, job_id, i) for i in ids)
        uri = f"{input_prefix.rstrip('/')}/{job_id}.jsonl"
        inputs[uri] = _jsonl(ids, texts)
        good.append(GoodJob(job_id, "uri", ids, texts, _job(job_id, {"uri": uri}),
                            parts_total=math.ceil(rows / checkpoint_rows), part_rows=checkpoint_rows))
    bad_jobs = _bad_jobs(name, input_prefix, output_root, inputs) if bad else []
    messages = [(j.key, j.value) for j in good] + [(b.key, b.value) for b in bad_jobs]
    rng.shuffle(messages)
    return Workload(good, bad_jobs, inputs, messages)


def _bad_jobs(name: str, input_prefix: str, output_root: str, inputs: dict[str, bytes]) -> list[BadJob]:
    """One of each kind of bad input (DESIGN invariant 6) that a worker must dead-letter."""
    missing = f"{input_prefix.rstrip('/')}/{name}-missing.jsonl"
    bad_file = f"{input_prefix.rstrip('/')}/{name}-bad-rows.jsonl"
    inputs[bad_file] = _jsonl(["a", "b", "c"], ["fine", "x" * 10_001, "fine too"])  # the tiny model's limit is 10 000
    outside = output_root.rsplit("/", 1)[0] + "/elsewhere"
    row = [{"id": "r0", "text": "hello"}]
    return [
        BadJob(f"{name}-bad-json", b'{"job_id": "oops", "model": ', "malformed_json"),
        BadJob(f"{name}-bad-version", json.dumps({"version": 2, "job_id": f"{name}-bad-version", "model": "tiny",
                                                  "inputs": {"rows": row}}).encode(), "unknown_version"),
        BadJob(f"{name}-bad-model", _job(f"{name}-bad-model", {"rows": row}, model="no-such-model"), "unknown_model"),
        BadJob(f"{name}-bad-missing", _job(f"{name}-bad-missing", {"uri": missing}), "input_missing"),
        BadJob(f"{name}-bad-outside", _job(f"{name}-bad-outside", {"rows": row}, output=outside),
               "output_outside_prefix"),
        BadJob(f"{name}-bad-row", _job(f"{name}-bad-row", {"rows": [{"id": "r0", "text": "ok"}, {"id": "r1", "text": 7}]}),
               "row_rejected"),
        BadJob(f"{name}-bad-uri-row", _job(f"{name}-bad-uri-row", {"uri": bad_file}), "row_rejected"),
    ]


def reference_outputs(workload: Workload, output_root: str) -> dict[str, tuple[bytes, list[str], np.ndarray]]:
    """What a clean run writes: {output URI: (Parquet bytes, ids, embeddings)}.

    The model runs here, in this process (the same tiny model the workers load), and
    the bytes come from spotbatch's own ParquetSink writing into a MemoryStore: the
    writer is deterministic (no timestamps; same pyarrow, same zstd settings), so a
    worker's object must equal these bytes exactly. URI jobs are cut into parts of
    the checkpoint interval's rows each (DESIGN: parts line up with batches), the last
    part shorter.
    """
    store = MemoryStore()
    sink = ParquetSink(output_root, store=store)
    refs = {}
    for job in workload.good:
        ids, texts = list(job.ids), list(job.texts)
        if job.kind == "inline":
            pieces = [(sink.output_uri(job.job_id), 0, len(ids))]
        else:
            pieces = [(sink.part_uri(job.job_id, None, i), i * job.part_rows, min(len(ids), (i + 1) * job.part_rows))
                      for i in range(job.parts_total)]
        for uri, start, stop in pieces:
            emb = expected_embeddings(texts[start:stop])
            sink.write(uri, ids[start:stop], {"embedding": emb}, TINY.metadata())  # as the worker writes it
            refs[uri] = (store.read_bytes(uri), ids[start:stop], emb)
    return refs


def verify_outputs(objects: dict[str, bytes], workload: Workload, refs: dict, output_root: str) -> None:
    """Everything under the output root (``objects``: URI -> bytes, temp files
    included; the local checkpoint store's lock files tolerated) is exactly what a clean run writes: one Parquet object per inline job,
    every part of every URI job plus its manifest and completed checkpoint; each
    Parquet object byte-for-byte the clean run's, and its decoded table equal too.
    """
    sink = ParquetSink(output_root)
    expected, tolerated = set(refs), set()
    for job in workload.uri:
        expected |= {sink.manifest_uri(job.job_id, None), checkpoint_uri(output_root, job.job_id)}
    for job_id in [job.job_id for job in workload.uri] + [bad.name for bad in workload.bad]:
        # The local checkpoint store serialises saves with flock on <job_id>.lock, and keeps
        # the lock file when a dead-lettered job's checkpoint is deleted.
        tolerated.add(checkpoint_uri(output_root, job_id).removesuffix(".json") + ".lock")
    missing, extra = sorted(expected - set(objects)), sorted(set(objects) - expected - tolerated)
    assert not missing and not extra, f"missing outputs {missing[:10]}; unexpected objects {extra[:10]}"
    for uri, (ref_bytes, ids, emb) in refs.items():
        got = pq.read_table(pa.BufferReader(objects[uri]))
        assert got.column_names == ["id", "embedding"], (uri, got.schema)
        assert got.column("id").to_pylist() == ids, uri
        np.testing.assert_array_equal(np.asarray(got.column("embedding").to_pylist(), dtype=np.float32), emb,
                                      err_msg=uri)
        assert objects[uri] == ref_bytes, f"{uri}: Parquet bytes differ from the clean run's"
    for job in workload.uri:
        manifest = json.loads(objects[sink.manifest_uri(job.job_id, None)])
        assert (manifest["job_id"], manifest["model"], manifest["rows"]) == (job.job_id, "tiny", len(job.ids))
        assert manifest["parts"] == [f"part-{i:05d}.parquet" for i in range(job.parts_total)], manifest
        cp = json.loads(objects[checkpoint_uri(output_root, job.job_id)])
        assert cp["complete"] and cp["parts_total"] == job.parts_total, cp
        assert cp["parts_done"] == list(range(job.parts_total)) and cp["rows_done"] == len(job.ids), cp


def checkpoint_uri(output_root: str, job_id: str) -> str:
    return join_uri(join_uri(output_root, "_checkpoints"), f"{job_id}.json")


def is_ledger(uri: str) -> bool:
    """The inline jobs' attempt ledgers (spotbatch/workers/attempts.py): bookkeeping
    every run writes, not outputs."""
    return "/_checkpoints/_attempts/" in uri


def local_objects(root: Path) -> dict[str, bytes]:
    """Every file under a local output root (hidden temp files too), but the attempt
    ledgers: path -> bytes."""
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and not is_ledger(str(p))}


def s3_objects(s3_client, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``s3://bucket/prefix`` but the attempt ledgers: URI -> bytes
    (latest versions)."""
    found = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if is_ledger(f"/{obj['Key']}"):
                continue
            body = s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            found[f"s3://{bucket}/{obj['Key']}"] = body
    return found


def verify_dead_letters(dead: list, workload: Workload, coords: dict) -> int:
    """The DLQ holds exactly the bad jobs (original key and bytes, the right error
    code), identified by their source coordinates; returns the number of duplicates
    (a bad job dead-lettered again after a redelivery: at-least-once, same content)."""
    bad_at = {coords[(b.key, b.value)]: b for b in workload.bad}
    seen = []
    for record in dead:
        h = dict(record.headers)
        at = (int(h["spotbatch.source.partition"]), int(h["spotbatch.source.offset"]))
        assert at in bad_at, (f"a good job was dead-lettered: {h.get('spotbatch.source.key')} {h['spotbatch.error.code']}: "
                              f"{h['spotbatch.error.reason'][:300]}")
        bad = bad_at[at]
        assert (h.get("spotbatch.source.key"), record.value) == (bad.key, bad.value), bad.name  # key: a header
        assert h["spotbatch.error.code"].decode() == bad.code, (bad.name, h["spotbatch.error.reason"])
        seen.append(at)
    missing = [bad_at[a].name for a in set(bad_at) - set(seen)]
    assert not missing, f"bad jobs missing from the DLQ: {missing}"
    return len(seen) - len(set(seen))


def verify_statuses(statuses: list[dict], workload: Workload, *, may_lack: set[str] = frozenset()) -> set[str]:
    """The results stream agrees: every good job reported ok (but those in
    ``may_lack``), none reported failed, every bad job with an id reported failed with
    its error code. Returns the good jobs without an ok status."""
    ok = {s["job_id"] for s in statuses if s["status"] == "ok"}
    failed = {s["job_id"]: s.get("error") for s in statuses if s["status"] == "failed"}
    good = {j.job_id for j in workload.good}
    assert good - ok <= may_lack, f"no ok status for {sorted(good - ok - may_lack)[:10]}"
    assert not good & set(failed), f"good jobs reported failed: {sorted(good & set(failed))[:10]}"
    for bad in workload.bad:
        if bad.code != "malformed_json":  # unparsable: its status carries no job id
            assert failed.get(bad.name) == bad.code, (bad.name, failed.get(bad.name))
    return good - ok


def publish_all(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> dict:
    """Send now; {(key, value): (partition, offset)}."""
    publisher = TricklePublisher(bootstrap, topic, messages, per_step=len(messages) or 1)
    return publisher.finish()


# ---- publishing --------------------------------------------------------------------


class TricklePublisher:
    """Publishes messages a few at a time (``per_step`` every ``step_s``) once released:
    the test releases a share of the workload after each interruption, so the workers
    always have fresh work and interruptions land on busy workers, not idle ones."""

    def __init__(self, bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], *, per_step: int = 8,
                 step_s: float = 0.25) -> None:
        self.topic = topic
        self._reserve = list(messages)
        self._pending: list[tuple[bytes, bytes]] = []
        self._per_step, self._step_s = per_step, step_s
        self._next_at = 0.0
        self._futures = []
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, request_timeout_ms=30_000)

    @property
    def done(self) -> bool:
        return not self._pending and not self._reserve

    def release(self, messages: list[tuple[bytes, bytes]] | None = None) -> None:
        """Queue ``messages`` (from those given at construction), or all that are left."""
        chosen = list(self._reserve) if messages is None else messages
        for message in chosen:
            self._reserve.remove(message)
        self._pending += chosen

    def step(self, now: float) -> None:
        if self._pending and now >= self._next_at:
            batch, self._pending = self._pending[: self._per_step], self._pending[self._per_step:]
            self._futures += [((k, v), self._producer.send(self.topic, key=k, value=v)) for k, v in batch]
            self._producer.flush()
            self._next_at = now + self._step_s

    def finish(self) -> dict[tuple[bytes, bytes], tuple[int, int]]:
        """Send the rest; {(key, value): (partition, offset)} of every message sent."""
        self.release()
        while self._pending:
            self.step(float("inf"))
        sent = {}
        for message, fut in self._futures:
            meta = fut.get(timeout=30)
            sent[message] = (meta.partition, meta.offset)
        self._producer.close()
        return sent


def log_ends_of(coords: Iterable[tuple[int, int]], partitions: int) -> dict[int, int]:
    """Log ends of a fresh topic from the coordinates of everything published to it."""
    ends = dict.fromkeys(range(partitions), 0)
    for partition, offset in coords:
        ends[partition] = max(ends[partition], offset + 1)
    return ends


def wait_committed(bootstrap: str, group: str, topic: str, ends: dict[int, int], timeout_s: float,
                   workers: Iterable[WorkerProc] = (), every_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = committed_offsets(bootstrap, group, topic)
        except KafkaError:
            got = {}
        if {p: got.get(p, 0) for p in ends} == ends:
            return
        if time.monotonic() > deadline:
            logs = "\n".join(w.describe() for w in workers)
            raise AssertionError(f"committed {got} != log ends {ends} after {timeout_s:.0f}s\n{logs}")
        time.sleep(every_s)


# ---- the supervisor -------------------------------------------------------------------

INTERRUPTIONS = ("sigkill", "sigterm", "notice")
_REBALANCE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO spotbatch\.worker (assigned|revoked|lost) \[",
                             re.MULTILINE)


@dataclass
class Life:
    """One worker process in a slot: from spawn to exit."""

    slot: int
    n: int
    proc: WorkerProc
    aws: FakeAws
    inference_log: Path
    started: float
    interrupt: str | None = None  # one of INTERRUPTIONS, or "final" for the end-of-run stop
    interrupted_at: float | None = None
    interrupted_while: str = ""  # what it was doing: "uri" (inferring a URI job's rows), "busy" or "idle"
    exited_at: float | None = None
    rc: int | None = None
    _ready: bool = False

    @property
    def name(self) -> str:
        return self.proc.name

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ready(self) -> bool:
        """Joined the group (its log shows an assignment): worth interrupting."""
        if not self._ready:
            self._ready = any(kind == "assigned" for _, kind in self.rebalance_events())
        return self._ready

    def rebalance_events(self) -> list[tuple[float, str]]:
        """(epoch seconds, "assigned" | "revoked" | "lost") from the worker's log."""
        try:
            text = self.proc.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m.group(2))
                for m in _REBALANCE_LINE.finditer(text)]

    def busy(self, within_s: float = 0.5) -> bool:
        """Ran rows through the model in the last ``within_s`` seconds (its inference log grew)."""
        try:
            return time.time() - self.inference_log.stat().st_mtime < within_s
        except FileNotFoundError:
            return False

    def recent_keys(self, within_s: float) -> list[str]:
        """Row keys it ran through the model in the last ``within_s`` seconds (the log's
        stamps are CLOCK_MONOTONIC, shared by every process on the machine)."""
        try:
            with open(self.inference_log, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 8192))
                lines = fh.read().decode(errors="replace").splitlines()[1:]
        except FileNotFoundError:
            return []
        since = time.monotonic() - within_s
        keys = []
        for line in lines:
            t, _, key = line.partition(" ")
            try:
                if float(t) >= since:
                    keys.append(key)
            except ValueError:
                continue
        return keys

    @property
    def stop_s(self) -> float | None:
        """Seconds from the interruption to the process exit."""
        if self.interrupted_at is None or self.exited_at is None:
            return None
        return self.exited_at - self.interrupted_at


class Supervisor:
    """Keeps ``slots`` worker processes running; interrupts one on request and
    restarts every process that exits, until ``stop_all``.

    Each process gets its own FakeAws metadata server (a notice is sent to one
    worker only) and its own inference log.
    """

    def __init__(self, bootstrap: str, topic: str, group: str, output: str, log_dir: Path, *, slots: int,
                 args: list[str], env: dict[str, str] | None = None) -> None:
        self.bootstrap, self.topic, self.group, self.output = bootstrap, topic, group, output
        self.log_dir, self.slots, self.args, self.env = log_dir, slots, args, env or {}
        self.current: dict[int, Life] = {}
        self.lives: list[Life] = []
        self.stopping = False

    def start(self) -> None:
        for slot in range(self.slots):
            self._spawn(slot)

    def _spawn(self, slot: int) -> Life:
        n = sum(1 for life in self.lives if life.slot == slot)
        name = f"w{slot}-{n:02d}"
        aws = FakeAws().__enter__()
        inference_log = self.log_dir / f"{name}.inferred"
        env = {
            **self.env,
            "PYTHONPATH": f"{SHIM_DIR}{os.pathsep}{REPO_ROOT}",
            INFERENCE_LOG_ENV: str(inference_log),
            "SPOTBATCH_AWS_METADATA_URL": aws.url,
            "SPOTBATCH_NOTICE_POLL_S": "0.1",
        }
        proc = spawn_worker(self.bootstrap, self.topic, self.group, self.output, self.log_dir, name=name,
                            burst=False, args=[*self.args, "--notice-source", "aws"], env=env)
        life = Life(slot, n, proc, aws, inference_log, time.monotonic())
        self.current[slot] = life
        self.lives.append(life)
        return life

    def tick(self) -> None:
        """Reap exited processes; restart them unless the run is stopping."""
        for slot, life in list(self.current.items()):
            rc = life.proc.proc.poll()
            if rc is None:
                continue
            life.rc, life.exited_at = rc, time.monotonic()
            life.aws.__exit__(None, None, None)
            del self.current[slot]
            if not self.stopping:
                self._spawn(slot)

    def may_interrupt(self) -> bool:
        """One interruption at a time: the previous victim has exited (its replacement
        may still be starting: that is a random moment too), and someone has joined.

        No waiting for a settled group: the embedded broker (Tansu 0.6.0) wedges a group
        for good when a member sends LeaveGroup while a join is pending (it keeps
        electing the departed member as leader; reproduced with plain kafka-python
        consumers), and the worker guards against that itself by not sending LeaveGroup
        on Tansu (Settings.leave_group "auto"). Interrupting during rebalances tests
        that guard; a wedged group shows up as a run that never finishes.
        """
        if any(life.interrupt is not None for life in self.current.values()):
            return False  # the previous victim is still draining
        return any(life.ready for life in self.current.values())

    def interrupt(self, kind: str, rng: random.Random, *, uri_marker: str = "-u") -> Life | None:
        """Interrupt one ready, not yet interrupted worker; None if there is none now.

        The victim is, by preference, one that inferred a URI job's rows in the last second
        (work that checkpoints protect), else one inferring anything, else any joined worker.
        """
        victims = [life for life in self.current.values() if life.interrupt is None and life.ready]
        if not victims:
            return None
        doing = {life.name: ("uri" if any(uri_marker in k for k in life.recent_keys(1.0))
                             else "busy" if life.busy() else "idle") for life in victims}
        for wanted in ("uri", "busy", "idle"):
            chosen = [life for life in victims if doing[life.name] == wanted]
            if chosen:
                victims = chosen
                break
        life = rng.choice(sorted(victims, key=lambda v: v.slot))
        life.interrupt, life.interrupted_at, life.interrupted_while = kind, time.monotonic(), doing[life.name]
        if kind == "sigkill":
            life.proc.proc.kill()
        elif kind == "sigterm":
            life.proc.proc.terminate()
        elif kind == "notice":
            life.aws.notice(action="terminate", in_s=120)
        else:
            raise ValueError(kind)
        return life

    def stop_all(self, timeout_s: float) -> None:
        """The end of the run: SIGTERM every live worker and wait for it."""
        self.stopping = True
        now = time.monotonic()
        for life in self.current.values():
            if life.interrupt is None:  # one already draining is left to finish on its own
                life.interrupt, life.interrupted_at = "final", now
                life.proc.signal(15)
        deadline = now + timeout_s
        for life in list(self.current.values()):
            try:
                life.proc.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                life.proc.kill()
        self.tick()

    def close(self) -> None:
        """Kill (by pid) whatever still runs; stop the metadata servers."""
        self.stopping = True
        for life in self.current.values():
            life.proc.kill()
            life.aws.__exit__(None, None, None)
        self.current.clear()

    def interrupted(self) -> list[Life]:
        return [life for life in self.lives if life.interrupt in INTERRUPTIONS]

    def describe(self) -> str:
        return "\n".join(life.proc.describe() for life in self.lives[-8:])


# ---- recomputed rows -----------------------------------------------------------------


@dataclass
class RecomputeReport:
    """Redundant model work, from the inference logs.

    Every row of a good job must go through the model once; each further inference of
    it is one recomputed row. A redundant inference by process L is *charged to L's
    interruption* when L still held the row's partition at the interruption (no
    revoke or loss in L's log between the inference and the interruption) and the
    row's next inference is by another process, after the interruption: L's result
    was lost with L (never written, or written but not committed, so the job was
    redelivered). Everything else (redone by the same process, or lost at a revoke
    while L ran on) comes from a partition moving in a rebalance: ``rebalance``.
    """

    inferences: int
    rows: int
    per_life: dict[str, int]  # life name -> rows charged to its interruption
    per_life_uri: dict[str, int]  # the part of per_life that belongs to URI jobs (parts)
    rebalance: int
    missing: list[str]  # good rows never inferred (must be empty)
    unexpected: list[str]  # inferred keys that belong to no good job
    last_by_job: dict[str, set[str]]  # job id -> the lives that made the last inference of its rows

    @property
    def total(self) -> int:
        return self.inferences - (self.rows - len(self.missing))


def recompute_report(lives: list[Life], good: list[GoodJob]) -> RecomputeReport:
    wall_minus_mono = time.time() - time.monotonic()  # one offset for every process here
    events: list[tuple[float, str, str]] = []
    revokes: dict[str, list[float]] = {}
    for life in lives:
        if life.inference_log.exists():
            for line in life.inference_log.read_text().splitlines():
                t, _, key = line.partition(" ")
                events.append((float(t), life.name, key))
        revokes[life.name] = [at - wall_minus_mono for at, kind in life.rebalance_events() if kind != "assigned"]
    events.sort()
    kind_of_job = {job.job_id: job.kind for job in good}
    wanted = {k for job in good for k in job.row_keys()}
    by_key: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for t, name, key in events:
        by_key[key].append((t, name))
    interrupted_at = {life.name: life.interrupted_at for life in lives
                      if life.interrupt in INTERRUPTIONS and life.interrupted_at is not None}
    per_life: Counter = Counter()
    per_life_uri: Counter = Counter()
    last_by_job: dict[str, set[str]] = defaultdict(set)
    rebalance = 0
    for key, seq in by_key.items():
        job_id = key.split("|", 1)[0]
        last_by_job[job_id].add(seq[-1][1])
        for (t, name), (t_next, name_next) in zip(seq, seq[1:]):
            at = interrupted_at.get(name)
            held = at is not None and not any(t <= r <= at for r in revokes[name])
            if held and name_next != name and t_next >= at:
                per_life[name] += 1
                per_life_uri[name] += kind_of_job.get(job_id) == "uri"
            else:
                rebalance += 1
    charged = [life.name for life in lives if life.name in interrupted_at]
    return RecomputeReport(
        inferences=sum(len(v) for k, v in by_key.items() if k in wanted), rows=len(wanted),
        per_life={n: per_life.get(n, 0) for n in charged}, per_life_uri={n: per_life_uri.get(n, 0) for n in charged},
        rebalance=rebalance, missing=sorted(wanted - set(by_key)), unexpected=sorted(set(by_key) - wanted),
        last_by_job=dict(last_by_job),
    )


# ---- a TCP proxy that can cut the broker connection -----------------------------------


class TcpProxy:
    """Forwards loopback TCP connections to ``target_port``.

    ``cut()`` resets every open connection and closes the listening socket, so new
    connections are refused; ``restore()`` listens again on the same port.
    """

    def __init__(self, target_port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host, self.target_port = host, target_port
        with socket.socket() as probe:
            probe.bind((host, 0))
            self.port = probe.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._listener: socket.socket | None = None
        self.accepted = 0
        self.cut_connections = 0
        self.bytes = 0
        self.cuts = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True, name="proxy-accept").start()
        return self

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = list(self._pairs), set()
            self.cuts += 1
            self.cut_connections += len(pairs)
        if listener is not None:
            listener.close()
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def restore(self) -> None:
        self.start()

    def close(self) -> None:
        self.cut()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            with self._lock:
                if self._listener is not listener:
                    return
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.host, self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            client.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                if self._listener is not listener:  # cut while we connected
                    _reset(client), _reset(upstream)
                    continue
                self._pairs.add(pair)
                self.accepted += 1
            for src, dst in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True, name="proxy-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                self.bytes += len(data)
        except OSError:
            pass
        with self._lock:
            known = pair in self._pairs
            self._pairs.discard(pair)
        if known:
            for sock in pair:
                _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Close with RST (linger 0), after a shutdown that wakes any thread in recv()."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def advertised_broker(proxy: TcpProxy) -> EmbeddedBroker:
    """Tansu listening on one port and advertising the proxy's, so that every client
    connection after bootstrap goes through the proxy as well. Not started yet."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy.target_port = port
    return EmbeddedBroker(port=port, advertised=proxy.address, startup_timeout_s=20.0)


# ---- an HTTP proxy in front of S3 that can answer 503 SlowDown ------------------------

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect",
        "content-length"}
_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message><RequestId>chaos</RequestId></Error>")


class S3FaultProxy:
    """Forwards S3 HTTP requests to ``upstream`` (moto); during an outage every request
    gets ``503 SlowDown``, as S3 answers when it sheds load."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname, parts.port
        self.down = False
        self.forwarded = 0
        self.refused = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> S3FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue handled for us

            def _relay(self) -> None:
                body = self._body()
                if proxy.down:
                    proxy.refused += 1
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(_SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy._host, proxy._port, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP:
                            conn.putheader(name, value)
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                proxy.forwarded += 1
                self.send_response(resp.status, resp.reason)
                for name, value in resp.getheaders():
                    if name.lower() not in _HOP:
                        self.send_header(name, value)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

            def log_message(self, *_args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *_exc) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---- reporting -------------------------------------------------------------------------


def table(rows: list[tuple], header: tuple | None = None) -> str:
    """A plain fixed-width table."""
    cells = ([tuple(str(c) for c in header)] if header else []) + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
